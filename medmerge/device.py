"""Device, precision and memory-format choices, resolved once from ``params.yaml``'s ``device`` section."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("medmerge.device")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: what ``device.cpu_kernels: portable`` sets before the first tensor operation: PyTorch's own vectorised
#: kernels, oneDNN's convolutions and MKL's BLAS all on their AVX2 code paths (MKL in its conditional
#: numerical reproducibility mode): the same CPU model then sums in the same order whatever instruction sets
#: it has beyond AVX2; another CPU model may still round differently (docs/reproducibility.md)
PORTABLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
CPU_KERNELS = ("portable", "native")


class KernelChoiceError(RuntimeError):
    """``device.cpu_kernels: portable`` came too late: PyTorch had already picked its kernels."""


def cpu_description() -> str:
    """This CPU as a time or a reproducibility claim must name it: model name, family and model numbers and
    its widest vector unit, from /proc/cpuinfo (the platform's processor string where there is none)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    vector = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "AVX2"
    return f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family')}, model {fields.get('model')}, {vector})"


def hold_cpu_kernels(kernels: str, threads: int) -> str:
    """Apply ``device.cpu_kernels`` and ``device.cpu_threads`` to this process; say what it trains with.

    ``portable`` holds PyTorch, oneDNN and MKL to their AVX2 code paths (:data:`PORTABLE_CPU_ENV`), which
    all three read once, at their first use: it must run before the process's first tensor operation (the
    stages call it first thing, through ``stage_runtime``). ``native`` leaves the environment as it is: each
    library picks the fastest code path of this CPU. ``threads`` > 0 sets torch's intra-op threads (the
    order of the sums depends on it too); 0 leaves torch's default, one per core.
    """
    if kernels not in CPU_KERNELS:
        raise ValueError(f"device.cpu_kernels must be one of {', '.join(CPU_KERNELS)}, got {kernels!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    threads_text = f"{count} thread{'' if count == 1 else 's'}"
    if kernels == "native":
        return f"native CPU kernels ({torch.backends.cpu.get_cpu_capability()}), {threads_text}"
    if platform.machine().lower() not in ("x86_64", "amd64"):  # the portable code paths are x86-64's AVX2
        return (f"native CPU kernels ({torch.backends.cpu.get_cpu_capability()}; portable ones are x86-64's), "
                f"{threads_text}")
    os.environ.update(PORTABLE_CPU_ENV)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        if capability in ("DEFAULT", "NO AVX"):  # a CPU without AVX2 cannot run the portable kernels
            log.warning("device.cpu_kernels: portable needs AVX2, which this CPU lacks: training with PyTorch's "
                        "%s kernels, whose results differ from an AVX2 machine's", capability)
            return f"{capability} CPU kernels (portable unavailable: no AVX2), {threads_text}"
        raise KernelChoiceError(
            f"device.cpu_kernels is portable, but PyTorch had already chosen its {capability} kernels in this "
            "process: hold_cpu_kernels must run before the first tensor operation")
    return f"portable CPU kernels (AVX2), {threads_text}"


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: the device, the autocast dtype (None = full precision), the layout."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    compute: str = ""  # what the stage trains with, for the model cards (e.g. "portable CPU kernels (AVX2), 2 threads")
    depthwise_taps: bool = False  # small-map depthwise weight gradients tap by tap (device.cpu_depthwise_grad)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def training_ops(self) -> contextlib.AbstractContextManager:
        """What a training step's forward pass runs under: :class:`~medmerge.depthwise.SmallMapDepthwise`
        with ``depthwise_taps`` (not under ``torch.compile``, which traces the library's convolutions)."""
        if not self.depthwise_taps or self.compile:
            return contextlib.nullcontext()
        from medmerge.depthwise import SmallMapDepthwise
        return SmallMapDepthwise()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16 on CUDA, where gradients can underflow."""
        enabled = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device; with ``channels_last`` every 4-D parameter and buffer (conv kernels) in
        that layout. Tensors of other ranks are left as they are: ``Module.to(memory_format=...)`` would
        refuse a merge's 5-D per-kernel coefficients. A module that stores kernels its own way (a merge's flat
        sources) says so with a ``use_channels_last()`` method."""
        model = model.to(self.device)
        if self.channels_last:
            for module in model.modules():
                if callable(getattr(module, "use_channels_last", None)):
                    module.use_channels_last()
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    if tensor.dim() == 4:
                        tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        return model


def resolve_runtime(
    device: str = "auto", mixed_precision: str = "auto", channels_last: str = "auto", compile: bool = False
) -> Runtime:
    """``auto`` picks CUDA when present, bf16 autocast where the GPU supports it, channels_last on GPUs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device.type is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    torch_device = torch.device(device)
    on_gpu = torch_device.type == "cuda"
    if mixed_precision == "auto":
        mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "none"
    if mixed_precision not in ("none", *_DTYPES):
        raise ValueError(f"device.mixed_precision must be auto, none, bf16 or fp16, got '{mixed_precision}'")
    amp_dtype = _DTYPES.get(mixed_precision)
    use_channels_last = on_gpu if channels_last == "auto" else channels_last == "on"
    runtime = Runtime(torch_device, amp_dtype, use_channels_last, compile)
    log.info(
        "device %s, mixed precision %s, channels_last %s, compile %s",
        torch_device, mixed_precision, use_channels_last, compile,
    )
    return runtime
