"""What the tests and the benchmarks share (as ``numpy.testing``): a copy of the repository in a temporary
git + DVC repo, subprocesses, the stages' environment, and the repository's scripts imported as modules.

Imports no torch, so that importing it costs a test or a benchmark nothing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[1]  # the checkout this package is imported from (a copy: that copy)
COPIED = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "medmerge", "pyproject.toml"]
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TIMEOUT_S = 900
TAIL_CHARS = 6000


def tail(text: str | bytes | None) -> str:
    """The last :data:`TAIL_CHARS` characters of a captured stream."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def run(args: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure (with ``check``) the assertion shows its whole output, and a command still
    running after :data:`TIMEOUT_S` seconds fails with the end of what it printed (where it stopped)."""
    try:
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"{' '.join(args)} still running after {TIMEOUT_S} s; it printed, last:\n"
                             f"{tail(timeout.stdout)}\n--- stderr, last:\n{tail(timeout.stderr)}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stage_env() -> dict:
    """The test's environment for stages: this venv first, offline, one thread, no inherited MLflow/DVC state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k not in PROXY_VARS}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_OFFLINE="1",
        MEDMERGE_THREADS="1",
        TQDM_DISABLE="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )
    return env


def copy_repo(root: Path, params: dict) -> Path:
    """The pipeline's files under ``root``, with ``params`` as its params.yaml."""
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def init_repo(root: Path, env: dict, message: str) -> None:
    """git + DVC initialised and everything committed (``dvc exp run`` needs a commit)."""
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", message], root, env)


def init_and_repro(root: Path, env: dict, message: str) -> None:
    """:func:`init_repo`, then a full ``dvc repro``."""
    init_repo(root, env, message)
    run(["dvc", "repro"], root, env)
