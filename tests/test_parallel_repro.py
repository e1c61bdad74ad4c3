"""``medmerge repro --jobs N`` on a small DVC project of shell stages: independent stages run side by side,
the lock file is what ``dvc repro`` writes, unchanged stages are skipped, and a failure is reported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medmerge import parallel_repro
from medmerge.parallel_repro import ReproError, reproduce

slow = pytest.mark.slow  # real dvc and git subprocesses: about 13 s per test on 2 cores


# two stages that each wait for the other to have started: serially, the first would time out and fail
MEET = ("touch {me}.started; for i in $(seq 300); do [ -e {other}.started ] && break; sleep 0.1; done; "
        "[ -e {other}.started ] && cat params.txt > {me}.txt")


def dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def project(root: Path, fail_b: bool = False) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    (root / "params.yaml").write_text("x: 1\n")
    stages = {
        "source": {"cmd": "python3 -c \"import yaml; print(yaml.safe_load(open('params.yaml'))['x'])\" > params.txt",
                   "params": ["x"], "outs": ["params.txt"]},
        "a": {"cmd": MEET.format(me="a", other="b"), "deps": ["params.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "exit 3" if fail_b else MEET.format(me="b", other="a"), "deps": ["params.txt"],
              "outs": ["b.txt"]},
        "both": {"cmd": "cat a.txt b.txt > both.txt", "deps": ["a.txt", "b.txt"], "outs": ["both.txt"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / ".gitignore").write_text("*.started\n.medmerge/\n")
    return root


def lock_entries(root: Path) -> dict:
    """dvc.lock without the parts that name the machine's paths."""
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


@slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_independent_stages_run_side_by_side_and_the_lock_is_dvc_repros(tmp_path: Path) -> None:
    parallel, serial = project(tmp_path / "parallel"), project(tmp_path / "serial")
    outcome = reproduce(jobs=2, root=parallel, echo=lambda line: None)
    assert set(outcome.ran) == {"source", "a", "b", "both"}
    assert (parallel / "both.txt").read_text() == "1\n1\n"
    assert "up to date" in dvc(parallel, "status")
    # dvc repro in the other copy: a and b wait for each other, so it runs them with an empty partner file
    (serial / "b.started").touch()
    (serial / "a.started").touch()
    dvc(serial, "repro")
    assert lock_entries(parallel) == lock_entries(serial)
    again = reproduce(jobs=2, root=parallel, echo=lambda line: None)
    assert again.ran == {} and set(again.skipped) == {"source", "a", "b", "both"}


@slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_change_reruns_what_it_reaches_only(tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    reproduce(jobs=2, root=root, echo=lambda line: None)
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text().replace("cat a.txt b.txt", "cat b.txt a.txt"))
    outcome = reproduce(jobs=2, root=root, echo=lambda line: None)
    assert set(outcome.ran) == {"both"} and {"source", "a", "b"} <= set(outcome.skipped)


@slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_failed_stage_is_named_with_its_log_and_nothing_after_it_runs(tmp_path: Path) -> None:
    root = project(tmp_path / "p", fail_b=True)
    with pytest.raises(ReproError, match=r"stage 'b' failed with exit status 3; its output: \.medmerge/logs/b\.log"):
        reproduce(jobs=2, root=root, echo=lambda line: None)
    assert not (root / "both.txt").exists()
    entries = lock_entries(root)
    assert "source" in entries and "b" not in entries and "both" not in entries


@slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_interrupted_run_records_the_stages_it_finished(tmp_path: Path) -> None:
    root = project(tmp_path / "p")

    def interrupt(line: str) -> None:
        if line == "Running stage 'both'":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(jobs=2, root=root, echo=interrupt)
    assert set(lock_entries(root)) == {"source", "a", "b"}
    outcome = reproduce(jobs=2, root=root, echo=lambda line: None)
    assert set(outcome.ran) == {"both"}


class _Stage:
    """A stage of its own file (not dvc.yaml's), counting its writes."""

    def __init__(self) -> None:
        self.writes = 0

    def dump(self, update_pipeline: bool) -> None:
        self.writes += 1


def test_finished_stages_are_written_together_at_most_every_interval() -> None:
    writer, first, second = parallel_repro.LockWriter(interval=3600), _Stage(), _Stage()
    writer.add(first)
    writer.write_if_due()
    writer.add(second)
    assert (first.writes, second.writes) == (0, 0)  # not yet due
    writer.write()
    writer.write()
    assert (first.writes, second.writes) == (1, 1)  # written once, then no longer waiting
    due, third = parallel_repro.LockWriter(interval=0), _Stage()
    due.add(third)
    due.write_if_due()
    assert third.writes == 1


def test_the_default_jobs_are_one_per_core_within_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_repro.os, "sched_getaffinity", lambda pid: set(range(16)))
    pages = {"SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(parallel_repro.os, "sysconf", lambda name: pages[name])
    pages["SC_PHYS_PAGES"] = 64 * 2**30 // 4096
    assert parallel_repro.default_jobs() == 16
    pages["SC_PHYS_PAGES"] = 8 * 2**30 // 4096  # 8 GiB hold two stages of 3 GiB
    assert parallel_repro.default_jobs() == 2
    pages["SC_PHYS_PAGES"] = 2 * 2**30 // 4096
    assert parallel_repro.default_jobs() == 1


# a stage module: writes what it was run with when the interpreter exits (so exit handlers must run),
# and says in its log whether torch was already imported (the zygote's preload) when it started
TOOL = '''import atexit, json, os, sys
print("preloaded" if "torch" in sys.modules else "fresh", flush=True)
out, mode = sys.argv[1], sys.argv[2]
record = {"argv": sys.argv[1:], "name": __name__, "stage": os.environ.get("DVC_STAGE"),
          "in_root": os.getcwd() == os.environ.get("DVC_ROOT"), "path0": sys.path[0] == os.getcwd()}
atexit.register(lambda: json.dump(record, open(out, "w")))
if mode == "fail":
    sys.exit(3)
if mode == "raise":
    raise ValueError("broken input")
'''


def module_project(root: Path, mode_b: str = "ok") -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    (root / "tool.py").write_text(TOOL)
    stages = {name: {"cmd": f"python -m tool {name}.json {mode}", "deps": ["tool.py"], "outs": [f"{name}.json"]}
              for name, mode in (("a", "ok"), ("b", mode_b))}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / ".gitignore").write_text(".medmerge/\n")
    return root


@slow
@pytest.mark.skipif(shutil.which("git") is None or not hasattr(parallel_repro.os, "fork"), reason="needs git, fork")
def test_python_module_stages_run_forked_from_the_zygote_as_python_would_run_them(tmp_path: Path) -> None:
    forked, isolated = module_project(tmp_path / "forked"), module_project(tmp_path / "isolated")
    reproduce(jobs=2, root=forked, echo=lambda line: None)
    reproduce(jobs=2, root=isolated, echo=lambda line: None, isolated=True)
    for name in ("a", "b"):
        record = yaml.safe_load((forked / f"{name}.json").read_text())
        assert record == {"argv": [f"{name}.json", "ok"], "name": "__main__", "stage": name, "in_root": True,
                          "path0": True}
        assert (forked / f"{name}.json").read_bytes() == (isolated / f"{name}.json").read_bytes()
        assert "preloaded" in (forked / ".medmerge/logs" / f"{name}.log").read_text()
        assert "fresh" in (isolated / ".medmerge/logs" / f"{name}.log").read_text()
    assert lock_entries(forked) == lock_entries(isolated)


@slow
@pytest.mark.skipif(shutil.which("git") is None or not hasattr(parallel_repro.os, "fork"), reason="needs git, fork")
@pytest.mark.parametrize(("mode", "status", "logged"), [("fail", 3, None), ("raise", 1, "ValueError: broken input")])
def test_a_forked_stage_fails_with_its_exit_status_and_traceback(tmp_path: Path, mode: str, status: int,
                                                                 logged: str | None) -> None:
    root = module_project(tmp_path / "p", mode_b=mode)
    with pytest.raises(ReproError, match=rf"stage 'b' failed with exit status {status}") as failure:
        reproduce(jobs=2, root=root, echo=lambda line: None)
    if logged:
        assert logged in str(failure.value)
    assert "b" not in lock_entries(root) and "a" in lock_entries(root)


def test_only_plain_python_module_commands_are_forked() -> None:
    command = parallel_repro.python_module_command
    assert command("python -m stages.train ft imagenet --seed 0") == ("stages.train", ["ft", "imagenet", "--seed", "0"])
    assert command("/venv/bin/python3 -m stages.evaluate") == ("stages.evaluate", [])
    for other in ("python stages/train.py", "python -m x > out.txt", "A=1 python -m x", "python -m x && echo",
                  "python -c 'print(1)'", "dvc repro", "python -m"):
        assert command(other) is None, other
