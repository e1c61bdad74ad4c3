"""Atomic writes: a stage that fails never leaves an output that a later stage could take for complete.

Temporaries sit beside their target as ``.<name>.tmp-<pid>-<random>`` (and ``.<name>.old-<pid>-<random>`` for
the directory being replaced): the same file system, so the final rename is atomic. A process killed with
``kill -9`` cannot remove its own, so the next write of the same target removes those whose process is gone;
until then the repository's ``.dvcignore`` and ``.gitignore`` hide them (``.*.tmp-*``, ``.*.old-*``), so a
leftover never changes the hash of a directory that a later stage depends on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY_KINDS = ("tmp", "old")


def _prefix(name: str, kind: str) -> str:
    """The start of this process's temporaries of ``name``: ``.<name>.<kind>-<pid>-``."""
    return f".{name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | Path, stem: str | None = None) -> list[Path]:
    """Remove the temporaries of ``path`` (see the module docstring) left by processes that no longer run.

    ``stem``: the name the temporaries carry, if not ``path``'s name (:func:`atomic_file` uses the stem).
    Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(stem or path.name)}\.(?:{'|'.join(TEMPORARY_KINDS)})-(\d+)-")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match is None or _alive(int(match[1])):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


@contextlib.contextmanager
def _parent_directory(path: Path) -> Iterator[None]:
    """``path``'s parent directory, created if missing; if the block fails, the directories this created are
    removed again (those still empty), so a failed write leaves no trace."""
    created = [parent for parent in path.parents if not parent.exists()]  # the deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: another writer's file is in it now
                directory.rmdir()
        raise


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` once the block succeeds.

    The old ``out_dir`` is moved aside before the new one is renamed into place and deleted after, so at
    every instant ``out_dir`` is either the complete old or the complete new directory. On failure the
    temporary directory (and any parent directory created for it) is removed and ``out_dir`` is untouched;
    temporaries of ``out_dir`` that a killed process left are removed first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    with _parent_directory(out_dir):
        remove_stale_temporaries(out_dir)
        temp = Path(tempfile.mkdtemp(prefix=_prefix(out_dir.name, "tmp"), dir=out_dir.parent))
        old = None
        try:
            yield temp
            os.chmod(temp, 0o755)
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=_prefix(out_dir.name, "old"), dir=out_dir.parent))
                os.replace(out_dir, old / out_dir.name)
            os.replace(temp, out_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); on success it is renamed onto ``path``, on
    failure it is removed with any parent directory created for it."""
    path = Path(path)
    with _parent_directory(path):
        remove_stale_temporaries(path, stem=path.stem)
        handle, name = tempfile.mkstemp(prefix=_prefix(path.stem, "tmp"), suffix=path.suffix, dir=path.parent)
        os.close(handle)
        temp = Path(name)
        try:
            yield temp
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file not found (did the stage that writes it run?)")
    return json.loads(path.read_text())
