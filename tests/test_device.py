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


def test_cpu_description_names_the_model_its_numbers_and_vector_unit() -> None:
    from pathlib import Path

    from medmerge.device import cpu_description

    described = cpu_description()
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").is_file() else ""
    if "model name" in first:
        name = next(line.split(":", 1)[1].strip() for line in first.splitlines() if line.startswith("model name"))
        family = next(line.split(":", 1)[1].strip() for line in first.splitlines() if line.startswith("cpu family"))
        assert described.startswith(f"{name} (family {family}, model ")
        assert described.endswith("AVX-512)") == (" avx512f" in first)
