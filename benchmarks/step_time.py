"""One kernel-weight learning step vs one plain full fine-tune step: same model, batch and device.

Alternates the two variants in one process and reports medians of repeated measurements, plus their
ratio (target: <= 1.0), and the operators ``torch.profiler`` records per step of each variant (a proxy
for kernel launches on a GPU; target: kernel-weight <= fine-tune). Usage:

    python benchmarks/step_time.py                       # resnet18 + tf_efficientnet_lite0, 64 px, batch 64
    python benchmarks/step_time.py --arch resnet18 --size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from medmerge.config import MergeSettings
from medmerge.device import resolve_runtime
from medmerge.models import create_model
from medmerge.pipeline import build_kernel_merge


def sources_for(arch: str, count: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append(create_model(arch, num_classes=1000).state_dict())
    return states


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
    classes = 4
    finetune = runtime.prepare(create_model(arch, num_classes=classes)).train()
    settings = MergeSettings(anchor="s0")
    merge = build_kernel_merge(arch, sources_for(arch, num_sources), [f"s{i}" for i in range(num_sources)],
                               classes, settings)
    merge = runtime.prepare(merge).train()
    groups = merge.learnable_groups()
    steps = {
        "finetune": make_step(finetune, list(finetune.parameters()), runtime),
        "kernel_weights": make_step(merge, groups["coefficients"] + groups["head"], runtime),
    }
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=runtime.device).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), device=runtime.device)
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
    coefficients = sum(p.numel() for p in groups["coefficients"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet18", "tf_efficientnet_lite0"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto")
    args = parser.parse_args()
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
