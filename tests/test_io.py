"""Atomic writes: what a killed writer leaves behind is hidden from DVC and removed by the next write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medmerge.io import atomic_directory, atomic_file, remove_stale_temporaries, write_json
from medmerge.testing import REPO

KILLED_WRITER = """
import os, signal, sys
from medmerge.io import atomic_directory, atomic_file
out = sys.argv[1]
with atomic_directory(out + "/m") as temp, atomic_file(out + "/metrics.json") as temp_file:
    (temp / "weights").write_text("half")
    temp_file.write_text("{")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_a_writer(parent: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(parent)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == -9, result.stderr


def test_a_killed_writer_leaves_temporaries_that_the_next_write_removes(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "m") as temp:
        (temp / "weights").write_text("complete")
    kill_a_writer(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and left[0].startswith(".m.tmp-") and left[1].startswith(".metrics.tmp-"), left
    assert (tmp_path / "m" / "weights").read_text() == "complete"  # the old output is untouched

    with atomic_directory(tmp_path / "m") as temp:
        (temp / "weights").write_text("new")
    write_json(tmp_path / "metrics.json", {"f1": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "metrics.json"]
    assert (tmp_path / "m" / "weights").read_text() == "new"


def test_only_temporaries_of_finished_processes_are_removed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead_pid, running.pid):
            (tmp_path / f".out.tmp-{pid}-abc").mkdir()
        (tmp_path / f".out.old-{dead_pid}-def").mkdir()
        (tmp_path / f".outer.tmp-{dead_pid}-abc").mkdir()  # another output's
        removed = remove_stale_temporaries(tmp_path / "out")
        assert sorted(p.name for p in removed) == [f".out.old-{dead_pid}-def", f".out.tmp-{dead_pid}-abc"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{running.pid}-abc",
                                                               f".outer.tmp-{dead_pid}-abc"]
    finally:
        running.kill()
        running.wait()



def test_a_failed_write_removes_the_directories_it_created(tmp_path: Path) -> None:
    """Nothing that was not there before: the parents made for a failed write go, those that existed stay."""
    (tmp_path / "models").mkdir()
    for write in (atomic_directory, atomic_file):
        with pytest.raises(ValueError, match="bad input"), write(tmp_path / "models" / "ft" / "seed_0" / "a"):
            raise ValueError("bad input")
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["models"]
    with atomic_directory(tmp_path / "models" / "ft" / "seed_0" / "a") as temp:
        (temp / "weights").write_text("complete")
    assert (tmp_path / "models" / "ft" / "seed_0" / "a" / "weights").read_text() == "complete"
