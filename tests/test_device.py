"""Device, precision and layout resolution."""

from __future__ import annotations

import pytest
import torch

from medmerge.device import resolve_runtime


def test_runtime_resolution_on_cpu() -> None:
    runtime = resolve_runtime("auto", "auto", "auto")
    if not torch.cuda.is_available():
        assert runtime.device.type == "cpu" and runtime.amp_dtype is None and not runtime.channels_last
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_runtime("cuda")
    assert resolve_runtime("cpu", "bf16").amp_dtype == torch.bfloat16
    assert not resolve_runtime("cpu", "fp16").grad_scaler().is_enabled()
