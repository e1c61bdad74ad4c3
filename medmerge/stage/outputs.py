"""What a stage leaves behind: its output directory (replaced atomically, by the main process only), the
resume checkpoints of its fits (removed once it has succeeded) and the input card of the models it saves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from medmerge import layout
from medmerge.io import atomic_directory
from medmerge.stage.runtime import is_main_process

if TYPE_CHECKING:
    from medmerge.config import Params
    from medmerge.resume import ResumeDir

#: where training stages keep their resume checkpoints, under the repository root (git- and DVC-ignored)
RESUME_ROOT = Path(".medmerge") / "resume"


class ResumeDirs:
    """The resume directories of one running stage (:func:`stage_resume`), removed by :meth:`clear` once the
    stage has succeeded."""

    def __init__(self) -> None:
        self._directories: list[ResumeDir] = []

    def add(self, directory: ResumeDir) -> None:
        if directory not in self._directories:
            self._directories.append(directory)

    def clear(self) -> None:
        """Remove every directory's checkpoints, and the folders above them left empty."""
        while self._directories:
            directory = self._directories.pop()
            directory.clear()
            for parent in (directory.path.parent, directory.path.parent.parent):
                with contextlib.suppress(OSError):  # not empty: another stage's checkpoints
                    parent.rmdir()


#: the directories of the stage that :func:`medmerge.stage.run` is running (None outside one)
_running_stage: ContextVar[ResumeDirs | None] = ContextVar("medmerge_stage_resume_dirs", default=None)


@contextlib.contextmanager
def collecting_resume_dirs() -> Iterator[ResumeDirs]:
    """The resume directories that :func:`stage_resume` gives out inside the block."""
    directories = ResumeDirs()
    token = _running_stage.set(directories)
    try:
        yield directories
    finally:
        _running_stage.reset(token)


def stage_identity() -> str:
    """The running stage as a file name: ``DVC_STAGE`` under DVC, else the script's name and arguments."""
    name = os.environ.get("DVC_STAGE") or " ".join([Path(sys.argv[0]).stem, *sys.argv[1:]])
    return re.sub(r"[^A-Za-z0-9@.=-]+", "_", name).strip("_.") or "stage"


def stage_resume(params: Params) -> ResumeDir:
    """Where this stage's fits keep their per-epoch resume checkpoints (``fit(resume=...)``):
    ``<repo>/.medmerge/resume/<stage>-<hash of the params>/``, outside every declared out.

    The repository root is ``DVC_ROOT``, so a stage of ``dvc exp run --temp`` or ``--queue`` finds its
    checkpoints again after a crash, and two experiments with different params never share a directory.
    Inside it, each fit's file is named by a fingerprint of that fit's inputs (initial weights, data, seeds,
    settings: :func:`medmerge.resume.fit_fingerprint`), so changed input directories start afresh.
    :func:`medmerge.stage.run` removes the directory when the stage succeeds.
    """
    from medmerge.resume import ResumeDir

    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    directory = ResumeDir(layout.repo_root() / RESUME_ROOT / f"{stage_identity()}-{digest[:12]}")
    running = _running_stage.get()
    if running is not None:
        running.add(directory)
    return directory


def model_input(arch: str, dataset: str) -> dict:
    """The preprocessing of a model trained on the prepared ``dataset``, for its card: the image size and
    resize policy its ``meta.json`` records, the normalisation of ``arch`` (see ``medmerge.models.input_card``)."""
    from medmerge.data.prepare import read_meta
    from medmerge.models import input_card

    meta = read_meta(layout.processed_dir(dataset))
    return input_card(arch, meta["image_size"], meta.get("resize", "squash"))


@contextlib.contextmanager
def stage_output(out_dir: Path) -> Iterator[Path]:
    """Where a stage writes ``out_dir``: atomically replaced on success, in the main process only, so a
    failed stage leaves ``out_dir`` as it was (absent if it was).

    The other processes of a multi-process run compute the same results; they write to a scratch directory
    that is thrown away.
    """
    if is_main_process():
        with atomic_directory(out_dir) as temp:
            yield temp
    else:
        with tempfile.TemporaryDirectory(prefix="medmerge-rank-") as scratch:
            yield Path(scratch)
