"""What every stage shares: running without torch, one-line errors, nothing left behind, exiting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_data_stages_run_without_torch(tmp_path: Path) -> None:
    """``fetch_data`` and ``prepare`` run (params validated, weight origins checked, synthetic data written
    and prepared) without importing torch, timm or MLflow: each of those costs seconds per process."""
    import subprocess
    import sys

    import yaml

    from medmerge.testing import REPO, copy_repo, stage_env

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"]["lesions"]["options"].update(n_train=8, n_val=4, n_test=4, image_size=16)
    root = copy_repo(tmp_path, params)
    # a stage run as a script ends with os._exit after its atexit handlers: the check is one of them
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'timm', 'mlflow') if m in sys.modules)))\n"
        "sys.argv = [sys.argv[1], 'lesions']\n"
        "runpy.run_module(f'stages.{sys.argv[0]}', run_name='__main__')\n"
    )
    for stage in ("fetch_data", "prepare"):
        out = subprocess.run([sys.executable, "-c", code, stage], cwd=root, env=stage_env(), capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (stage, out.stderr)
    assert (root / "data" / "processed" / "lesions").is_dir()


def test_a_failed_fetch_data_stops_with_one_line_and_leaves_no_directory(tmp_path: Path) -> None:
    """A truncated ``.npz`` (``origin: npz``) stops ``fetch_data`` with one line naming the file; neither
    ``data/raw/<dataset>/`` nor ``data/raw`` is left behind."""
    import subprocess
    import sys

    import yaml

    from medmerge.data.synthetic import generate_synthetic
    from medmerge.testing import REPO, copy_repo, stage_env

    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, **generate_synthetic("lesions", 8, 4, 4, 16, 0))
    arrays.write_bytes(arrays.read_bytes()[:-200])  # cut short: the zip directory at its end is gone
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"]["lesions"].update(origin="npz", options={"path": str(arrays)})
    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo", params)
    out = subprocess.run([sys.executable, "-m", "stages.fetch_data", "lesions"], cwd=root, env=stage_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert f"ERROR medmerge.stage: {arrays}: not a readable .npz file" in line, out.stderr
    assert not (root / "data" / "raw").exists()


def test_every_input_error_stops_a_stage_with_its_message(caplog: pytest.LogCaptureFixture) -> None:
    """Each library's bad-input error derives from ``InputError``: ``run`` exits 1 with its message."""
    from medmerge.config import ConfigError
    from medmerge.data.npz import DataError
    from medmerge.merge.alignment import AlignmentError
    from medmerge.merge.coefficients import GranularityError
    from medmerge.merge.functional import SourceMismatchError
    from medmerge.models.checkpoint import CheckpointError
    from medmerge.models.factory import StateDictMismatchError
    from medmerge.models.origins import OriginError, WeightsUnavailableError
    from medmerge.registry import UnknownNameError
    from medmerge.stage import run

    for error in (ConfigError, DataError, AlignmentError, GranularityError, SourceMismatchError, CheckpointError,
                  StateDictMismatchError, OriginError, WeightsUnavailableError, UnknownNameError,
                  FileNotFoundError):
        def failing(error: type[Exception] = error) -> None:
            raise error(f"bad {error.__name__}")

        with pytest.raises(SystemExit) as stopped:
            run(failing)
        assert stopped.value.code == 1 and caplog.records[-1].getMessage() == f"bad {error.__name__}"


def test_a_stage_script_exits_after_its_threads_and_exit_handlers(tmp_path: Path) -> None:
    """After ``run(main)`` of a script (which spares the interpreter's teardown its garbage-collector walk),
    what a normal exit guarantees still happens: other threads finish, idle thread-pool workers are stopped
    (not waited for forever: MLflow's HTTP artifact repository keeps a pool, and a stage that had downloaded
    through it hung), ``atexit`` handlers run and buffered output reaches stdout; the exit code is 0."""
    import subprocess
    import sys

    from medmerge.testing import REPO

    script = tmp_path / "stage_like.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from pathlib import Path\n"
        "from medmerge.stage import run\n"
        "POOL = ThreadPoolExecutor(2)  # alive until exit, its workers idle\n"
        "def late_write():\n"
        "    time.sleep(0.3)\n"
        "    Path(sys.argv[1]).write_text('written')\n"
        "def main():\n"
        "    POOL.submit(time.sleep, 0.01).result()\n"
        "    threading.Thread(target=late_write).start()\n"
        "    atexit.register(lambda: print('exit handler ran'))\n"
        "    sys.stdout.write('buffered, no newline')\n"
        "if __name__ == '__main__':\n"
        "    run(main)\n"
    )
    marker = tmp_path / "marker.txt"
    out = subprocess.run([sys.executable, str(script), str(marker)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "written"
    assert out.stdout == "buffered, no newlineexit handler ran\n"
