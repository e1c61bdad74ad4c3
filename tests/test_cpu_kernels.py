"""``device.cpu_kernels``: portable training (the linear probe included) gives the same bits as a process started
with every kernel library held to AVX2, NumPy's too (the code paths of a CPU with AVX2 and nothing wider), and it must come
before PyTorch's first kernel choice."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from medmerge.device import PORTABLE_CPU_ENV

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the portable kernels are x86-64's AVX2 code paths")

# a few AdamW steps of a small net with the layer kinds that round differently between instruction sets
# (dense, depthwise and 1x1 convolutions through oneDNN, BatchNorm, a linear head through BLAS), channels_last
TRAIN = """
import hashlib, sys, torch
from torch import nn
from medmerge.device import hold_cpu_kernels
print(hold_cpu_kernels(sys.argv[1], 2), file=sys.stderr)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
                    nn.Conv2d(32, 32, 5, padding=2, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
                    nn.Conv2d(32, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
net = net.to(memory_format=torch.channels_last)
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
x = torch.randn(16, 3, 12, 12).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 5, (16,))
for _ in range(5):
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
from medmerge.train import logistic_regression
with torch.no_grad():
    features = net[:-1](x).numpy()
probe = logistic_regression(features, y.numpy(), 5)  # LP-FT's linear probe, fitted on the CPU's kernels too
digest = hashlib.sha256()
for array in [*(t.contiguous().numpy() for t in net.state_dict().values()), *probe]:
    digest.update(array.tobytes())
print(digest.hexdigest())
"""
#: NumPy and OpenBLAS held to AVX2 as well: what the stages compute must not depend on their code paths either
NUMPY_AVX2_ENV = {"NPY_DISABLE_CPU_FEATURES": "AVX512_SPR AVX512_ICL X86_V4", "OPENBLAS_CORETYPE": "Haswell"}


def unheld_environment() -> dict[str, str]:
    """This environment without any instruction-set hold or thread override."""
    return {k: v for k, v in os.environ.items() if k not in (*PORTABLE_CPU_ENV, *NUMPY_AVX2_ENV, "MEDMERGE_THREADS")}


def train_digest(kernels: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", TRAIN, kernels], env={**unheld_environment(), **(env or {})},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def native_capability() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_portable_kernels_train_the_bits_of_a_process_held_to_avx2_from_its_start():
    held_from_start = train_digest("native", {**PORTABLE_CPU_ENV, **NUMPY_AVX2_ENV})
    assert train_digest("portable") == held_from_start
    if native_capability() == "AVX512":  # the hold changes something here: without it the bits differ
        assert train_digest("native") != held_from_start


@pytest.mark.slow
def test_portable_kernels_after_pytorch_chose_its_kernels_fail_clearly():
    if native_capability() == "AVX2":
        pytest.skip("this CPU's own kernels are the portable ones: no wrong choice to detect")
    script = ("import torch; torch.ones(64).add_(1).sum(); from medmerge.device import hold_cpu_kernels; "
              "hold_cpu_kernels('portable', 2)")
    result = subprocess.run([sys.executable, "-c", script], env=unheld_environment(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "had already chosen its" in result.stderr and "kernels" in result.stderr


def test_unknown_kernel_choice_is_refused():
    from medmerge.device import hold_cpu_kernels

    with pytest.raises(ValueError, match="device.cpu_kernels must be one of portable, native, got 'fast'"):
        hold_cpu_kernels("fast", 2)


def test_report_header_says_what_trained_the_models_and_what_another_machine_gets():
    from medmerge.report import report_header

    def header(computes):
        return report_header("lesions", [0, 1, 2], "lpft_imagenet", 0.7, "f1_macro", 0.95, 2000, 600, (), computes)

    portable = header(["portable CPU kernels (AVX2), 2 threads"])
    assert "Every model was trained with portable CPU kernels (AVX2), 2 threads" in portable
    assert "reproduced exactly" in portable
    native = header(["native CPU kernels (AVX512), 1 thread"])
    assert "Every model was trained with native CPU kernels (AVX512), 1 thread: the same CPU model" in native
    assert "reproduced exactly" in native
    mixed = header(["portable CPU kernels (AVX2), 2 threads", "NVIDIA H200"])
    assert "Models were trained with portable CPU kernels (AVX2), 2 threads; NVIDIA H200" in mixed
    assert "reproduced exactly" not in mixed and "the t interval covers that" in mixed
    assert "trained with" not in header([])
