"""``medmerge repro --jobs N``: ``dvc repro`` with independent stages run side by side.

DVC runs one stage at a time. This runner walks the same graph (DVC's own index of ``dvc.yaml``), and
does for each stage what ``dvc repro`` does, under the repository's DVC lock: a stage whose upstream
stages are finished is checked (``changed``: its deps, params, outs or command differ from ``dvc.lock``);
an unchanged stage is skipped, a changed one has its outs removed and its command run as DVC runs it
(``DVC_ROOT``, ``DVC_STAGE`` set), at most ``jobs`` commands at a time; a finished one is saved and
committed to the cache, and written to ``dvc.lock`` with the others finished since the last write, at most
every :data:`LOCK_INTERVAL` seconds and at the end. So a later ``dvc repro`` or ``dvc status`` finds the
pipeline up to date, and the outputs are the ones ``dvc repro`` writes: each stage runs alone in its
process with the threads ``device.cpu_threads`` gives it, whatever runs beside it. Unlike ``dvc repro`` it
does not restore a changed stage's outputs from DVC's run cache: it runs the stage.

A command that is only ``python -m <module> [args]`` (every stage of this project's ``dvc.yaml``) runs the
module as that command would, but in a child forked from a *zygote*: one interpreter per run that imported
the stages' libraries (torch, timm, MLflow, and what the stage modules import) once, with one thread,
before any tensor operation. Each stage then skips the 3 to 5 s of imports it would pay on its own (AMD EPYC,
Zen 4), and starts as a fresh interpreter would after them: torch has started no threads and picked no kernels, so ``device.cpu_kernels``
and ``device.cpu_threads`` act in the stage as in a new process, and it writes the same bits (measured:
benchmarks/README.md). ``isolated=True`` (``medmerge repro --isolated``) starts every command in its own
shell and interpreter, as ``dvc repro`` does.

Each command's output goes to ``.medmerge/logs/<stage>.log`` (parallel outputs would interleave); the
runner prints one line per stage. The first failure stops new stages from starting; the running ones
finish (and are recorded), and the runner exits with the failed stage's name and the end of its log.
This module is DVC glue, imported only by the CLI (`medmerge repro`).
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import runpy
import select
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR = Path(".medmerge/logs")
log = logging.getLogger("medmerge.repro")


class ReproError(RuntimeError):
    """A stage's command failed: its name, its exit status and where its output is."""


STAGE_MEMORY = 3 * 2**30  # the most one stage of the default pipeline held (3.2 GB peak RSS, benchmarks/README.md)
#: seconds between two writes of ``dvc.lock`` while stages run. DVC rewrites the whole file for each stage (0.7 s
#: of one core with the default's 79 stages, AMD EPYC, Zen 4); the runner writes the stages finished since
#: the last write together, at most this often, and at the end, whether the run succeeded, failed or was
#: interrupted. Only a killed runner (SIGKILL, power loss) leaves up to this many seconds of finished stages
#: unrecorded, which the next run then runs again.
LOCK_INTERVAL = 30.0


def default_jobs() -> int:
    """One stage per core this process may use, and no more than the memory holds at :data:`STAGE_MEMORY`
    a stage."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, memory // STAGE_MEMORY))


@dataclass
class Outcome:
    """What the runner did: the stages it ran (with their seconds), those it skipped as unchanged."""

    ran: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None


def _log_path(root: Path, stage) -> Path:
    return root / LOG_DIR / (stage.addressing.replace("/", "_").replace(":", "_") + ".log")


#: what the zygote imports beside the stage modules: the libraries they load lazily. MLflow imports its
#: SQLAlchemy store (SQLAlchemy, Alembic) at a stage's first run and GitPython for the run's tags; the metrics
#: load scikit-learn, the alignment SciPy's assignment solver: about 1.3 s of one core in every training stage
#: (AMD EPYC, Zen 4), which a forked stage now finds imported
PRELOAD = ("torch", "timm", "mlflow", "mlflow.data.meta_dataset", "mlflow.types", "safetensors.torch",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
           "alembic.runtime.migration", "git", "sklearn.metrics", "scipy.optimize")
_SHELL_SYNTAX = set("|&;<>()$`*?[]{}~!#=\\'\"\n")


def python_module_command(command: str) -> tuple[str, list[str]] | None:
    """``(module, arguments)`` of a command that is only ``python -m <module> [arguments]`` (plain words, no
    shell syntax, no variable assignments), else None."""
    if _SHELL_SYNTAX & set(command):
        return None
    words = command.split()
    if len(words) < 3 or words[1] != "-m" or os.path.basename(words[0]) not in ("python", "python3"):
        return None
    return words[2], words[3:]


def run_module_as_main(module: str, arguments: list[str], cwd: str, log_path: str, env: dict[str, str]) -> int:
    """In a forked child of the zygote: what ``cd cwd && python -m module arguments >> log_path 2>&1 </dev/null``
    does with ``env`` added, down to its exit (other threads joined, exit handlers run): its exit status."""
    stdin = os.open(os.devnull, os.O_RDONLY)
    output = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(stdin, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(stdin)
    os.close(output)
    os.chdir(cwd)
    os.environ.update(env)
    sys.path.insert(0, cwd)  # python -m puts the working directory first
    sys.argv = [module, *arguments]
    status: int | str | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        status = exit_.code
    except BaseException:  # noqa: BLE001 - the interpreter would print it and exit 1
        traceback.print_exc()
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(status or 0)


def top_level_imports(module: str) -> list[str]:
    """The modules that ``module``'s own file imports at its top level (``import x``, ``from x import y``),
    found without running it; none when it cannot be found."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    names = []
    for node in ast.parse(Path(spec.origin).read_text(), spec.origin).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def serve(libraries: Iterable[str], stage_modules: Iterable[str]) -> None:
    """The zygote: import ``libraries`` and what the ``stage_modules`` import at their top level (not the
    stage modules themselves, whose code is the stage's to run), then for each request line on stdin (JSON:
    ``id``, ``module``, ``arguments``, ``cwd``, ``log``, ``env``) fork a child that runs it
    (:func:`run_module_as_main`), and write ``{"id", "status"}`` to stdout when the child exits. Ends when
    stdin closes and its children have exited.

    It imports and forks with one thread, so a child starts as a fresh interpreter would after its imports:
    torch has started no thread pool and picked no kernels, and the child's ``device.cpu_kernels`` and
    ``device.cpu_threads`` apply as they do in a new process. A module that fails to import is left for the
    stage to fail on."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the imports print goes to the zygote's log, not among the replies
    for name in [*libraries, *(name for module in stage_modules for name in top_level_imports(module))]:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - the stage that imports it reports it
            print(f"not preloaded: {name}: {error}", file=sys.stderr)
    children: dict[int, object] = {}
    pending = b""  # requests read from stdin, not yet served (select sees the pipe, not a reader's buffer)
    open_ = True
    while open_ or children:
        ready, _, _ = select.select([0] if open_ else [], [], [], 0.05 if children else None)
        if ready:
            chunk = os.read(0, 65536)
            open_ = bool(chunk)
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    status = run_module_as_main(request["module"], request["arguments"], request["cwd"],
                                                request["log"], request["env"])
                finally:
                    os._exit(status)
            children[pid] = request["id"]
        while children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            replies.write(json.dumps({"id": children.pop(pid), "status": os.waitstatus_to_exitcode(wait_status)}) + "\n")
            replies.flush()


class Zygote:
    """A process that imported the stages' libraries once and forks each ``python -m`` stage command from
    itself (:func:`serve`); :meth:`run` may be called from several threads at once. ``modules``: the stage
    modules whose imports it loads."""

    def __init__(self, root: Path, modules: Iterable[str], log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "import json, sys; from medmerge.parallel_repro import serve; "
                 "serve(*json.loads(sys.argv[1]))", json.dumps([PRELOAD, sorted(set(modules))])],
                cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
        self._lock = threading.Lock()
        self._waiting: dict[int, list] = {}
        self._closed = False
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                reply = json.loads(line)
                event, result = self._waiting.pop(reply["id"])
                result.append(reply["status"])
                event.set()
        finally:  # the zygote died (or spoke out of turn): the fate of its children is unknown
            with self._lock:
                self._closed = True
                for event, result in self._waiting.values():
                    result.append(-1)
                    event.set()
                self._waiting.clear()

    def run(self, module: str, arguments: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> int:
        """Run ``python -m module arguments`` in a child of the zygote; its exit status (-1: the zygote died)."""
        event, result = threading.Event(), []
        with self._lock:
            if self._closed:
                return -1
            self._next += 1
            self._waiting[self._next] = [event, result]
            request = {"id": self._next, "module": module, "arguments": arguments, "cwd": str(cwd),
                       "log": str(log_path), "env": env}
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                return -1
        event.wait()
        return result[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self.process.wait()


class LockWriter:
    """Finished stages waiting to be written to their lock file, written together (one rewrite of
    ``dvc.lock`` for all of them) by :meth:`write`, or by :meth:`write_if_due` once :data:`LOCK_INTERVAL`
    seconds have passed since the last write."""

    def __init__(self, interval: float | None = None):
        self.interval = LOCK_INTERVAL if interval is None else interval
        self.waiting: list = []
        self.last = time.monotonic()

    def add(self, stage) -> None:
        self.waiting.append(stage)

    def write_if_due(self) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.write()

    def write(self) -> None:
        from dvc.stage import PipelineStage

        by_file: dict[str, list] = {}
        for stage in self.waiting:
            if isinstance(stage, PipelineStage):  # dvc.yaml's stages share dvc.lock
                by_file.setdefault(stage.dvcfile.path, []).append(stage)
            else:  # a .dvc file holds its own stage
                stage.dump(update_pipeline=False)
        for stages in by_file.values():
            stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
        self.waiting.clear()
        self.last = time.monotonic()


def _run_command(root: Path, stage, env: dict[str, str], zygote: Zygote | None = None) -> tuple[int, float]:
    """``stage``'s command as DVC runs it, its output to its log file: (exit status, seconds). With a
    ``zygote``, a ``python -m`` command runs in a child forked from it."""
    from dvc.env import DVC_ROOT, DVC_STAGE

    path = _log_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    cwd = root / stage.wdir if stage.wdir else root
    stage_env = {DVC_ROOT: str(root), DVC_STAGE: stage.addressing}
    start = time.perf_counter()
    with path.open("w") as out:
        for command in _commands(stage):
            out.write(f"> {command}\n")
            out.flush()
            module = python_module_command(command) if zygote is not None else None
            if module is not None:
                status = zygote.run(*module, cwd, path, stage_env)
            else:
                status = subprocess.call(command, shell=True, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**env, **stage_env})
            if status:
                return status, time.perf_counter() - start
    return 0, time.perf_counter() - start


def _commands(stage) -> list[str]:
    return stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]


def _upstream(graph, targets: Iterable) -> set:
    """``targets`` and every stage they depend on, directly or not (DVC's graph: an edge a -> b when a
    depends on b)."""
    import networkx as nx

    stages = set()
    for target in targets:
        stages |= {target} | nx.descendants(graph, target)
    return stages


def reproduce(jobs: int | None = None, targets: Iterable[str] = (), root: str | Path = ".",
              echo: Callable[[str], None] = print, isolated: bool = False) -> Outcome:
    """Bring ``targets`` (every stage when empty) up to date, ``jobs`` stage commands at a time (default: one
    per core); ``isolated``: each command in its own shell, none forked from the pre-imported interpreter.
    Raises :class:`ReproError` after the running stages finish if one failed."""
    from dvc.repo import Repo

    jobs = jobs or default_jobs()
    logging.getLogger("dvc").setLevel(logging.WARNING)  # its "Updating lock file" once per stage
    root = Path(root).resolve()
    env = dict(os.environ)
    outcome = Outcome()
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
        graph = repo.index.graph
        order = {stage: index for index, stage in enumerate(graph.nodes)}  # dvc.yaml's order: upstream first
        chosen = [stage for target in targets for stage in repo.stage.collect(target)] if targets else graph.nodes
        pending = _upstream(graph, chosen)
        done: set = set()
        queued: list = []  # changed, waiting for a free slot
        running: dict[Future, object] = {}
        failed = None
        modules = {module[0] for stage in pending if stage.cmd and not stage.frozen
                   for module in map(python_module_command, _commands(stage)) if module is not None}
        zygote = None if isolated or not modules or not hasattr(os, "fork") else \
            Zygote(root, modules, root / LOG_DIR / "zygote.log")
        lock_writer = LockWriter()
        with contextlib.ExitStack() as cleanup, ThreadPoolExecutor(max_workers=jobs) as pool:
            cleanup.callback(lock_writer.write)  # last: after the running stages have finished and been saved
            if zygote is not None:
                cleanup.callback(zygote.close)
            while True:
                ready = [stage for stage in pending if all(dep in done for dep in graph.successors(stage))]
                for stage in sorted(ready, key=order.__getitem__) if failed is None else []:
                    pending.discard(stage)
                    if stage.cmd and not stage.frozen and stage.changed():
                        queued.append(stage)
                    else:
                        outcome.skipped.append(stage.addressing)
                        done.add(stage)
                if ready and failed is None:
                    continue  # skipped stages may have made others ready
                while queued and len(running) < jobs and failed is None:
                    stage = queued.pop(0)
                    stage.remove_outs(ignore_remove=False, force=False)
                    echo(f"Running stage '{stage.addressing}'")
                    running[pool.submit(_run_command, root, stage, env, zygote)] = stage
                if not running:
                    if pending and failed is None:
                        raise RuntimeError(f"stages left that nothing runs before: {sorted(map(str, pending))}")
                    break
                lock_writer.write_if_due()  # while the stages just started run
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stage = running.pop(future)
                    status, seconds = future.result()
                    if status:
                        failed = failed or (stage, status)
                        echo(f"Stage '{stage.addressing}' failed (exit {status}) after {seconds:.1f} s")
                        continue
                    stage.save(allow_missing=False, run_cache=True)
                    stage.commit(allow_missing=False)
                    lock_writer.add(stage)
                    outcome.ran[stage.addressing] = seconds
                    done.add(stage)
                    echo(f"Stage '{stage.addressing}' done in {seconds:.1f} s")
    if failed is not None:
        stage, status = failed
        outcome.failed = stage.addressing
        path = _log_path(root, stage)
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise ReproError(f"stage '{stage.addressing}' failed with exit status {status}; its output: "
                         f"{path.relative_to(root)}\n{tail}")
    return outcome
