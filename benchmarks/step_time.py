"""Step time: one kernel-weight learning step ÷ one plain fine-tune step (target ≤ 1.0).

Same model, batch and device. Alternates the two variants in one process and reports medians of repeated measurements, plus their
ratio (target: <= 1.0), and the operators ``torch.profiler`` records per step of each variant (a proxy
for kernel launches on a GPU; target: kernel-weight <= fine-tune). On its own it prints its own table;
``python -m benchmarks suite`` puts its rows (:func:`table_rows`) into the suite's. Usage:

    python -m benchmarks step_time                       # resnet18 + tf_efficientnet_lite0, 64 px, batch 64
    python -m benchmarks step_time --arch resnet18 --size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from medmerge.config import MergeSettings
from medmerge.device import Runtime, resolve_runtime
from medmerge.methods.medmerge import build_learned_merge
from medmerge.models import create_model

from .results import row, runtime_label

CLASSES = 4
VARIANTS = ("finetune", "kernel_weights")
TARGET = ("<=", 1.0)


def sources_for(arch: str, count: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append(create_model(arch, num_classes=1000).state_dict())
    return states


def build_variant(arch: str, variant: str, runtime: Runtime, num_sources: int) -> tuple[nn.Module, list]:
    """The model and learnable parameters of one variant: a fine-tuned model, or a kernel-weight merge of
    ``num_sources`` seeded sources (default settings) learning its coefficients and head."""
    if variant == "finetune":
        model = runtime.prepare(create_model(arch, num_classes=CLASSES)).train()
        return model, list(model.parameters())
    names = [f"s{i}" for i in range(num_sources)]
    merge = build_learned_merge(arch, sources_for(arch, num_sources), names, CLASSES, MergeSettings(anchor="s0"))
    merge = runtime.prepare(merge).train()
    groups = merge.learnable_groups()
    return merge, groups["coefficients"] + groups["head"]


def example_batch(size: int, batch: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=runtime.device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, CLASSES, (batch,), device=runtime.device)


def make_step(model: nn.Module, params: list, runtime) -> callable:
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = runtime.grad_scaler()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def sync(runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def operator_counts(step: callable, x: torch.Tensor, y: torch.Tensor, runtime, steps: int = 3) -> dict[str, float]:
    """Per step: every ATen operator the profiler records (nested calls included), the leaf ones among them
    (those that call no other operator: the ones that do the work), and on CUDA the kernels launched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    sync(runtime)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(x, y)
        sync(runtime)
    events = prof.events()
    operators = [e for e in events if e.name.startswith("aten::")]
    leaves = [e for e in operators if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernels = [e for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")]
    return {"operators": len(operators) / steps, "leaf_operators": len(leaves) / steps,
            "kernel_launches": len(kernels) / steps}


def measure(arch: str, size: int, batch: int, repeats: int, runtime, num_sources: int) -> dict:
    variants = {variant: build_variant(arch, variant, runtime, num_sources) for variant in VARIANTS}
    steps = {variant: make_step(model, params, runtime) for variant, (model, params) in variants.items()}
    x, y = example_batch(size, batch, runtime)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        for _ in range(2):
            step(x, y)
    sync(runtime)
    for _ in range(repeats):
        for name, step in steps.items():  # alternate so drift hits both equally
            start, cpu_start = time.perf_counter(), time.process_time()
            step(x, y)
            sync(runtime)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
    coefficients = sum(p.numel() for p in variants["kernel_weights"][0].learnable_groups()["coefficients"])
    counts = {name: operator_counts(step, x, y, runtime) for name, step in steps.items()}
    return {"arch": arch, "size": size, "batch": batch, "coefficients": coefficients,
            "finetune_s": medians["finetune"], "kernel_weights_s": medians["kernel_weights"],
            "ratio": medians["kernel_weights"] / medians["finetune"],
            # CPU time of this process per step (all its threads): less sensitive than wall time to other
            # jobs on a shared machine, blind to time spent waiting for a GPU
            "finetune_cpu_s": cpu["finetune"], "kernel_weights_cpu_s": cpu["kernel_weights"],
            "cpu_ratio": cpu["kernel_weights"] / cpu["finetune"],
            "times_s": times, "cpu_times_s": cpu_times,
            **{f"{name}_{what}": value for name, c in counts.items() for what, value in c.items()}}


def table_rows(args, runtime: Runtime) -> tuple[list[dict], list[dict]]:
    """The suite's rows: the step-time ratio per architecture (and on a CPU the CPU-time ratio), and the
    ratios of operators, leaf operators and (CUDA) kernel launches per step."""
    rows, raw = [], []
    for arch in args.arch:
        r = measure(arch, args.size, args.batch, args.repeats, runtime, args.sources)
        raw.append(r)
        config = runtime_label(runtime, args.size, args.batch)
        rows.append(row(
            "step_time", f"step time, kernel-weight ÷ fine-tune, {arch}", config,
            f"{r['kernel_weights_s'] * 1e3:.1f} ms ÷ {r['finetune_s'] * 1e3:.1f} ms", r["ratio"], TARGET,
        ))
        if runtime.device.type == "cpu":
            rows.append(row(
                "step_time", f"CPU time per step, kernel-weight ÷ fine-tune, {arch}", config,
                f"{r['kernel_weights_cpu_s'] * 1e3:.1f} ms ÷ {r['finetune_cpu_s'] * 1e3:.1f} ms", r["cpu_ratio"],
                TARGET,
            ))
        for what, label in (("operators", "operators"), ("leaf_operators", "leaf operators"),
                            ("kernel_launches", "CUDA kernel launches")):
            finetune, kernel = r[f"finetune_{what}"], r[f"kernel_weights_{what}"]
            if finetune:
                rows.append(row("step_time", f"{label} per step (torch.profiler), kernel-weight ÷ fine-tune, "
                                f"{arch}", config, f"{kernel:,.0f} ÷ {finetune:,.0f}", kernel / finetune, TARGET))
        print(f"step_time {arch}: {r['ratio']:.3f}; operators {r['kernel_weights_operators']:.0f} vs "
              f"{r['finetune_operators']:.0f}", file=sys.stderr, flush=True)
    return rows, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks step_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet18", "tf_efficientnet_lite0"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto")
    args = parser.parse_args(argv)
    runtime = resolve_runtime(args.device, args.mixed_precision)
    print(f"device {runtime.device}, amp {runtime.amp_dtype}, channels_last {runtime.channels_last}, "
          f"threads {torch.get_num_threads()}")
    print("| arch | px | batch | sources | coefficients | fine-tune step (s) | kernel-weight step (s) | ratio "
          "| operators per step, fine-tune | kernel-weight |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        r = measure(arch, args.size, args.batch, args.repeats, runtime, args.sources)
        print(f"| {r['arch']} | {r['size']} | {r['batch']} | {args.sources} | {r['coefficients']:,} | "
              f"{r['finetune_s']:.3f} | {r['kernel_weights_s']:.3f} | {r['ratio']:.2f} | "
              f"{r['finetune_operators']:,.0f} | {r['kernel_weights_operators']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
