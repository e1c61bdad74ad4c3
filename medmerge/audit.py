"""Which files a stage opens: a Python audit hook that records every ``open`` under the repository.

``dvc.yaml`` must declare every file a stage reads, or DVC skips the stage when that file changes and
``dvc repro <stage>`` on a fresh clone cannot know what to run first. The end-to-end tests run the stages
with ``MEDMERGE_AUDIT_OPENS=<log file>``: each stage process then appends one JSON line per opened path
(``{"stage": $DVC_STAGE, "path": <relative to the repository>, "mode": "r"|"w"}``) when it exits, and the
test checks every path against the stage's declared deps and outs in ``dvc.lock``.

Files inside the Python environment and bytecode caches are not recorded. Libraries that open files in
native code (safetensors, SQLite) are not seen by the hook: the checkpoint loader hashes every weights file
through Python first, so weights reads are recorded all the same.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

ENV = "MEDMERGE_AUDIT_OPENS"

_opened: dict[str, str] = {}  # relative path -> "r" or "w" (written at least once)


def _is_write(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _hook_for(root: Path, ignored: tuple[str, ...]):
    def hook(event: str, args: tuple) -> None:
        if event != "open" or not args or not isinstance(args[0], str | os.PathLike):
            return
        path = os.path.abspath(os.fspath(args[0]))
        if not path.startswith(str(root) + os.sep) or path.startswith(ignored) or "__pycache__" in path:
            return
        relative = os.path.relpath(path, root)
        write = _is_write(args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else None)
        if write or relative not in _opened:
            _opened[relative] = "w" if write or _opened.get(relative) == "w" else "r"

    return hook


def _flush(log_file: str, stage: str) -> None:
    lines = "".join(json.dumps({"stage": stage, "path": path, "mode": mode}) + "\n" for path, mode in _opened.items())
    with open(log_file, "a", encoding="utf-8") as handle:  # outside the repository: not recorded
        handle.write(lines)


def install_from_environment() -> bool:
    """Install the hook if ``MEDMERGE_AUDIT_OPENS`` names a log file; True when installed."""
    log_file = os.environ.get(ENV)
    if not log_file:
        return False
    root = Path.cwd().resolve()  # stages run in the repository root (a temporary copy under `dvc exp run --temp`)
    ignored = tuple(str(Path(p).resolve()) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    stage = os.environ.get("DVC_STAGE") or " ".join(sys.argv)
    sys.addaudithook(_hook_for(root, ignored))
    atexit.register(_flush, os.path.abspath(log_file), stage)
    return True
