"""End to end: a training stage killed with SIGKILL after its first epoch, rerun by `dvc repro`, ends
byte-identical to an uninterrupted run; the temporary output it left is invisible to git and DVC and removed."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medmerge.testing import REPO, copy_repo, init_repo, run, stage_env

pytestmark = pytest.mark.integration

STAGE, SOURCE, EPOCHS = "pretrain@imagenet-0", "imagenet", 3

# Runs the stage's command (``python -m <module> <args>``, passed as arguments) as DVC would, but stops dead
# after writing its first resume checkpoint, so that the test kills it at a known point (the tiny stage would
# finish faster than anyone could kill it).
STOP_AFTER_FIRST_CHECKPOINT = """
import runpy, sys, time
from medmerge.resume import ResumeDir
save = ResumeDir.save
def save_and_wait(self, fingerprint, state):
    save(self, fingerprint, state)
    time.sleep(600)
ResumeDir.save = save_and_wait
module, sys.argv[1:] = sys.argv[1], sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def tiny_params() -> dict:
    """32 images of 32 px per split, two ~0.1M-parameter random sources, 3 pretraining epochs, one seed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image_size"] = 32
    params["data"]["datasets"] = {name: params["data"]["datasets"][name] for name in ("lesions", "shapes")}
    for dataset in params["data"]["datasets"].values():
        dataset["options"].update(n_train=32, n_val=16, n_test=16, image_size=32)
    for seed, source in enumerate(params["sources"].values()):
        source.update(arch="test_efficientnet", origin="random", options={"seed": seed}, task="shapes")
    params["pretrain"].update(epochs=EPOCHS, batch_size=8)
    params["seeds"] = [0]
    return params


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoints(root: Path) -> list[Path]:
    return sorted((root / ".medmerge" / "resume").glob("*/fit-*.pt"))


def test_a_killed_training_stage_resumes_and_ends_byte_identical(tmp_path: Path) -> None:
    root, env = copy_repo(tmp_path, tiny_params()), stage_env()
    init_repo(root, env, "tiny pretraining")
    out = root / "models" / "pretrained" / "seed_0" / SOURCE

    run(["dvc", "repro", STAGE], root, env)  # the uninterrupted run (and every stage upstream of it)
    expected = {name: sha256(out / name) for name in ("model.safetensors", "card.json", "config.json")}
    assert not checkpoints(root), "a succeeded stage leaves no resume checkpoint"

    python, flag, module, *args = shlex.split(yaml.safe_load((root / "dvc.lock").read_text())["stages"][STAGE]["cmd"])
    assert (python, flag) == ("python", "-m"), "the stage is expected to run as python -m <module>"
    stage = subprocess.Popen([sys.executable, "-c", STOP_AFTER_FIRST_CHECKPOINT, module, *args], cwd=root,
                             env={**env, "DVC_STAGE": STAGE, "DVC_ROOT": str(root)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not checkpoints(root):
        assert stage.poll() is None, f"the stage ended before its first checkpoint:\n{stage.communicate()[0]}"
        assert time.monotonic() < deadline, "no resume checkpoint within 300 s"
        time.sleep(0.05)
    stage.kill()  # SIGKILL: no cleanup of any kind runs
    stage.communicate()
    assert stage.returncode == -9

    [checkpoint] = checkpoints(root)
    assert checkpoint.parent.name.startswith(f"{STAGE}-")
    left = [p for p in out.parent.iterdir() if p.name.startswith(f".{SOURCE}.tmp-")]
    assert len(left) == 1, sorted(p.name for p in out.parent.iterdir())
    for tool in (["git", "check-ignore", "-q"], ["dvc", "check-ignore", "-q"]):
        for path in (left[0], checkpoint):
            run([*tool, str(path.relative_to(root))], root, env)  # exit 0: ignored

    rerun = run(["dvc", "repro", "-f", "-s", STAGE], root, env)  # DVC removes the out first, as after any crash
    assert f"resuming after epoch 1 of {EPOCHS}" in rerun.stdout + rerun.stderr, rerun.stderr
    assert {name: sha256(out / name) for name in expected} == expected
    assert not checkpoints(root) and not (root / ".medmerge" / "resume").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [SOURCE]
