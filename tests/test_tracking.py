"""The MLflow store survives concurrent first writers (dvc queue start -j N)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = "import sys; from medmerge.tracking import ensure_experiment; print(ensure_experiment('medmerge', sys.argv[1]))"


def test_concurrent_processes_initialise_one_fresh_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, uri], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-2000:]
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1, ids
