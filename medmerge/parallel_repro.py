"""``medmerge repro --jobs N``: ``dvc repro`` with independent stages run side by side.

DVC runs one stage at a time. This runner walks the same graph (DVC's own index of ``dvc.yaml``), and
does for each stage what ``dvc repro`` does, under the repository's DVC lock: a stage whose upstream
stages are finished is checked (``changed``: its deps, params, outs or command differ from ``dvc.lock``);
an unchanged stage is skipped, a changed one has its outs removed and its command run as DVC runs it
(``DVC_ROOT``, ``DVC_STAGE`` set), at most ``jobs`` commands at a time; a finished one is saved,
committed to the cache and written to ``dvc.lock``. So a later ``dvc repro`` or ``dvc status`` finds the
pipeline up to date, and the outputs are the ones ``dvc repro`` writes: each stage runs alone in its
process with the threads ``device.cpu_threads`` gives it, whatever runs beside it. Unlike ``dvc repro`` it
does not restore a changed stage's outputs from DVC's run cache: it runs the stage.

Each command's output goes to ``.medmerge/logs/<stage>.log`` (parallel outputs would interleave); the
runner prints one line per stage. The first failure stops new stages from starting; the running ones
finish (and are recorded), and the runner exits with the failed stage's name and the end of its log.
This module is DVC glue, imported only by the CLI (`medmerge repro`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR = Path(".medmerge/logs")
log = logging.getLogger("medmerge.repro")


class ReproError(RuntimeError):
    """A stage's command failed: its name, its exit status and where its output is."""


STAGE_MEMORY = 3 * 2**30  # the most one stage of the default pipeline held (3.2 GB peak RSS, benchmarks/README.md)


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


def _run_command(root: Path, stage, env: dict[str, str]) -> tuple[int, float]:
    """``stage``'s command as DVC runs it, its output to its log file: (exit status, seconds)."""
    from dvc.env import DVC_ROOT, DVC_STAGE

    path = _log_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with path.open("w") as out:
        commands = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
        for command in commands:
            out.write(f"> {command}\n")
            out.flush()
            status = subprocess.call(command, shell=True, cwd=root / stage.wdir if stage.wdir else root,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     env={**env, DVC_ROOT: str(root), DVC_STAGE: stage.addressing})
            if status:
                return status, time.perf_counter() - start
    return 0, time.perf_counter() - start


def _upstream(graph, targets: Iterable) -> set:
    """``targets`` and every stage they depend on, directly or not (DVC's graph: an edge a -> b when a
    depends on b)."""
    import networkx as nx

    stages = set()
    for target in targets:
        stages |= {target} | nx.descendants(graph, target)
    return stages


def reproduce(jobs: int | None = None, targets: Iterable[str] = (), root: str | Path = ".",
              echo: Callable[[str], None] = print) -> Outcome:
    """Bring ``targets`` (every stage when empty) up to date, ``jobs`` stage commands at a time (default: one
    per core). Raises :class:`ReproError` after the running stages finish if one failed."""
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
        with ThreadPoolExecutor(max_workers=jobs) as pool:
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
                    running[pool.submit(_run_command, root, stage, env)] = stage
                if not running:
                    if pending and failed is None:
                        raise RuntimeError(f"stages left that nothing runs before: {sorted(map(str, pending))}")
                    break
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
                    stage.dump(update_pipeline=False)
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
