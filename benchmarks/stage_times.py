"""Wall time of each stage of ``dvc repro`` (or ``medmerge repro --jobs N``) in a fresh copy of the repository
(no target).

The copy is the scratch repository the end-to-end tests use (``medmerge.testing``), with the default
params or ``--params`` overrides; each line of the runner's output is stamped as it arrives. Under
``dvc repro`` a stage's time runs from its ``Running stage`` line to the next one (or the end); under
``medmerge repro`` (``--jobs N``), where stages overlap, it is the time the runner reports for its command. Runs in the suite
(``python -m benchmarks suite --measure stage_times``); on its own, ``python -m benchmarks stage_times``
takes the suite's options.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from medmerge import testing
from medmerge.device import Runtime

from .results import row


def set_dotted(params: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--params takes key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = yaml.safe_load(value)


def stage_env() -> dict:
    """The tests' stage environment, but with torch threads as the machine gives them (no MEDMERGE_THREADS)
    and unbuffered output, so that each line is stamped when it is printed."""
    env = testing.stage_env()
    env.pop("MEDMERGE_THREADS")
    env.update(PYTHONUNBUFFERED="1")
    return env


def measure(args, runtime: Runtime | None = None) -> tuple[list[dict], dict]:
    """``runtime`` is unused: the stages choose their own devices from the params."""
    params = yaml.safe_load((testing.REPO / "params.yaml").read_text())
    for assignment in args.params:
        set_dotted(params, assignment)
    env = stage_env()
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    jobs = getattr(args, "jobs", 0)
    command = [sys.executable, "-m", "medmerge.cli", "repro", "--jobs", str(jobs)] if jobs else [dvc, "repro"]
    runner = f"`medmerge repro --jobs {jobs}`" if jobs else "`dvc repro`"
    with tempfile.TemporaryDirectory(prefix="medmerge-stages-") as tmp:
        root = testing.copy_repo(Path(tmp), params)
        testing.init_repo(root, env, "benchmark")
        events: list[tuple[float, str]] = []  # (seconds since start, stage name)
        reported: dict[str, float] = {}  # medmerge repro: each stage's own time
        tail: list[str] = []
        start = time.perf_counter()
        with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                now = time.perf_counter() - start
                tail = (tail + [line.rstrip()])[-40:]
                if args.verbose:
                    print(f"[{now:7.1f}s] {line.rstrip()}", file=sys.stderr, flush=True)
                match = re.search(r"Running stage '([^']+)'", line)
                if match:
                    events.append((now, match.group(1)))
                    print(f"stage_times [{now:6.1f}s] {match.group(1)}", file=sys.stderr, flush=True)
                done = re.search(r"Stage '([^']+)' done in ([\d.]+) s", line)
                if done:
                    reported[done.group(1)] = float(done.group(2))
        total = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{runner} failed ({proc.returncode}):\n" + "\n".join(tail))
    ends = [t for t, _ in events[1:]] + [total]
    stages = reported if jobs else {name: end - begin for (begin, name), end in zip(events, ends, strict=True)}
    overrides = " ".join(args.params) if args.params else "default params"
    config = f"{runner}, {overrides}"
    rows = [row("stage_times", f"stage `{name}`", config, f"{seconds:.1f} s", None)
            for name, seconds in stages.items()]
    rows.append(row("stage_times", "DVC start-up before the first stage", config,
                    f"{events[0][0] if events else total:.1f} s", None))
    rows.append(row("stage_times", f"**whole {runner}**", config, f"{total:.1f} s", None))
    return rows, {"params": args.params, "jobs": jobs, "stages_s": stages, "total_s": total}


def main(argv: list[str] | None = None) -> None:
    from .suite import run_suite  # here, not above: the suite imports this module

    run_suite(["stage_times"], argv, __doc__)


if __name__ == "__main__":
    main()
