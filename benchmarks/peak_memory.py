"""Peak memory of kernel-weight learning ÷ that of fine-tuning (target ≤ 1.5).

CUDA: ``max_memory_allocated`` in this process. CPU: each variant in a fresh child process
(``python -m benchmarks.peak_memory --child SPEC``), its peak RSS (VmHWM). Two rows per architecture:
"whole" = peak - the process's memory before the model is built (model/source tensors + one training
step); "step only" = peak - memory right after the model is built. Medians of ``--memory-repeats``
measurements per variant, the variants alternating. Runs in the suite (``python -m benchmarks suite``);
on its own, ``python -m benchmarks peak_memory`` takes the suite's options.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from medmerge.device import Runtime, resolve_runtime

from . import REPO
from .results import row, runtime_label
from .step_time import VARIANTS, build_variant, example_batch, make_step, sync

TARGET = ("<=", 1.5)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes(resettable: bool) -> int:
    if resettable:
        return status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, never reset


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process; returns bytes: RSS before and after building one variant, peak of its steps.

    Both variants first run the same tiny warm-up (one step of each variant at 32 px, batch 2), so code and
    kernels that torch pages in lazily count as neither variant's memory; then the peak is reset.
    """
    torch.set_num_threads(spec["threads"])
    runtime = resolve_runtime("cpu", "none", "off")
    torch.manual_seed(0)
    tiny = example_batch(32, 2, runtime)
    for variant in VARIANTS:
        model, params = build_variant(spec["arch"], variant, runtime, spec["sources"])
        make_step(model, params, runtime)(*tiny)
        del model, params
    x, y = example_batch(spec["size"], spec["batch"], runtime)
    trim()
    resettable = reset_peak()
    before = status_kib("VmRSS") * 1024
    model, params = build_variant(spec["arch"], spec["variant"], runtime, spec["sources"])
    trim()
    built, built_peak = status_kib("VmRSS") * 1024, peak_bytes(resettable)
    resettable = resettable and reset_peak()
    step = make_step(model, params, runtime)
    for _ in range(spec["steps"]):
        step(x, y)
    peak = peak_bytes(resettable)
    return {"before": before, "built": built, "built_peak": built_peak, "peak": peak, "hwm_reset": resettable}


def cpu_peak(arch: str, variant: str, args) -> dict:
    spec = {"arch": arch, "variant": variant, "size": args.size, "batch": args.batch, "sources": args.sources,
            "steps": args.memory_steps, "threads": torch.get_num_threads()}
    result = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--child", json.dumps(spec)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child {arch}/{variant} failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.strip().splitlines()[-1])
    if r["built_peak"] > r["peak"]:
        print(f"peak_memory note: {arch}/{variant}: building peaked higher ({r['built_peak'] - r['before']:,} "
              "bytes) than training", file=sys.stderr)
    return {"whole": r["peak"] - r["before"], "step": r["peak"] - r["built"], "model": r["built"] - r["before"]}


def cuda_peak(arch: str, variant: str, args, runtime: Runtime) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    x, y = example_batch(args.size, args.batch, runtime)
    before = torch.cuda.memory_allocated()
    model, params = build_variant(arch, variant, runtime, args.sources)
    built = torch.cuda.memory_allocated()
    step = make_step(model, params, runtime)
    for _ in range(args.memory_steps):
        step(x, y)
    sync(runtime)
    peak = torch.cuda.max_memory_allocated()
    del model, params, step, x, y
    return {"whole": peak - before, "step": peak - built, "model": built - before}


def measure(args, runtime: Runtime) -> tuple[list[dict], list[dict]]:
    on_cuda = runtime.device.type == "cuda"
    rows, raw = [], []
    for arch in args.arch:
        samples = {variant: [] for variant in VARIANTS}
        for _ in range(args.memory_repeats):
            for variant in VARIANTS:  # alternate
                measured = cuda_peak(arch, variant, args, runtime) if on_cuda else cpu_peak(arch, variant, args)
                samples[variant].append(measured)
        med = {v: {k: statistics.median(s[k] for s in samples[v]) for k in ("whole", "step", "model")}
               for v in VARIANTS}
        raw.append({"arch": arch, "how": "cuda max_memory_allocated" if on_cuda else "child peak RSS",
                    **{f"{v}_{k}_bytes": med[v][k] for v in VARIANTS for k in ("whole", "step", "model")}})
        how = "max_memory_allocated" if on_cuda else "peak RSS of a fresh process"
        for key, label in (("whole", "model tensors + training step"), ("step", "training step only")):
            ratio = med["kernel_weights"][key] / med["finetune"][key]
            measured = f"{med['kernel_weights'][key] / 2**20:,.0f} ÷ {med['finetune'][key] / 2**20:,.0f} MiB"
            rows.append(row("peak_memory", f"peak memory ({label}), kernel-weight ÷ fine-tune, {arch}",
                            f"{runtime_label(runtime, args.size, args.batch)}; {how}", measured, ratio, TARGET))
            print(f"peak_memory {arch} {key}: {ratio:.3f}", file=sys.stderr, flush=True)
    return rows, raw


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the fresh process of one CPU measurement (cpu_peak)
        print(json.dumps(memory_child(json.loads(argv[1]))))
        return
    from .suite import run_suite  # here, not above: the suite imports this module

    run_suite(["peak_memory"], argv, __doc__)


if __name__ == "__main__":
    main()
