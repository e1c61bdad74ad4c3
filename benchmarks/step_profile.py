"""Where the time of one step of each variant goes: phase timings and the top operators.

Phases of one step of each variant, timed with ``perf_counter`` (synchronising on CUDA), the variants
alternating, medians of ``--repeats``; a separate probe times the blend's forward and backward alone, which
splits the kernel-weight backward into the network's part and the blend's. Then ``torch.profiler`` lists
the operators with the most self time per step. Printed after the suite's table
(``python -m benchmarks suite --measure ... step_profile``); on its own, ``python -m benchmarks
step_profile`` takes the suite's options.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from medmerge.device import Runtime

from .step_time import VARIANTS, build_variant, example_batch, make_step, sync


def phase_times(arch: str, args, runtime: Runtime) -> dict:
    """Median milliseconds of each phase of one step of each variant, alternating the variants."""
    ft, ft_params = build_variant(arch, "finetune", runtime, args.sources)
    kw, kw_params = build_variant(arch, "kernel_weights", runtime, args.sources)
    ft_opt, kw_opt = torch.optim.AdamW(ft_params, lr=1e-3), torch.optim.AdamW(kw_params, lr=1e-3)
    x, y = example_batch(args.size, args.batch, runtime)
    with torch.no_grad():
        cotangents = [torch.ones_like(w) for w in kw.merged_parameters().values()]

    def clock() -> float:
        sync(runtime)
        return time.perf_counter()

    def finetune_step() -> dict:
        t0 = clock()
        with runtime.autocast():
            loss = nn.functional.cross_entropy(ft(x).float(), y)
        t1 = clock()
        ft_opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = clock()
        ft_opt.step()
        t3 = clock()
        return {"network forward + loss": t1 - t0, "backward (all)": t2 - t1, "optimizer": t3 - t2}

    def kernel_step() -> dict:
        t0 = clock()
        with runtime.autocast():
            weights = kw.merged_parameters(reuse_buffers=True)  # as its forward does
            t1 = clock()
            loss = nn.functional.cross_entropy(functional_call(kw.skeleton, weights, (x,), strict=False).float(), y)
        t2 = clock()
        kw_opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = clock()
        kw_opt.step()
        t4 = clock()
        return {"blend forward": t1 - t0, "network forward + loss": t2 - t1, "backward (all)": t3 - t2,
                "optimizer": t4 - t3}

    def blend_only() -> dict:
        t0 = clock()
        with runtime.autocast():
            weights = kw.merged_parameters(reuse_buffers=True)
        t1 = clock()
        torch.autograd.backward(list(weights.values()), cotangents)
        t2 = clock()
        kw_opt.zero_grad(set_to_none=True)
        return {"blend forward": t1 - t0, "blend backward": t2 - t1}

    probes = {"finetune": finetune_step, "kernel_weights": kernel_step, "blend_only": blend_only}
    for probe in probes.values():
        probe(), probe()
    samples: dict[str, list[dict]] = {name: [] for name in probes}
    for _ in range(args.repeats):
        for name, probe in probes.items():
            samples[name].append(probe())
    med = {name: {k: statistics.median(s[k] for s in runs) * 1e3 for k in runs[0]} for name, runs in samples.items()}
    blend_backward = med["blend_only"]["blend backward"]
    kernel = dict(med["kernel_weights"])
    kernel["backward (blend → coefficients)"] = blend_backward
    kernel["backward (network)"] = kernel.pop("backward (all)") - blend_backward
    finetune = dict(med["finetune"])
    finetune["backward (network)"] = finetune.pop("backward (all)")
    return {"finetune": finetune, "kernel_weights": kernel,
            "coefficients": sum(p.numel() for p in kw.learnable_groups()["coefficients"]),
            "blended_values": sum(c.numel() for c in cotangents),
            "finetune_parameters": sum(p.numel() for p in ft_params)}


def top_ops(arch: str, args, runtime: Runtime, steps: int = 3, limit: int = 10) -> dict:
    """``torch.profiler``: the operators with the most self time, per step, for each variant."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = runtime.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    x, y = example_batch(args.size, args.batch, runtime)
    out = {}
    for variant in VARIANTS:
        model, params = build_variant(arch, variant, runtime, args.sources)
        step = make_step(model, params, runtime)
        for _ in range(2):
            step(x, y)
        sync(runtime)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step(x, y)
            sync(runtime)
        attr = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
        total = sum(getattr(e, attr) for e in events)
        events.sort(key=lambda e: getattr(e, attr), reverse=True)
        out[variant] = {
            "clock": "self CUDA time" if on_cuda else "self CPU time",
            "total_ms": total / steps / 1e3,
            "ops": [{"op": e.key, "ms": getattr(e, attr) / steps / 1e3, "share": getattr(e, attr) / total,
                     "calls": e.count // steps} for e in events[:limit]],
        }
        del model, params, step
    return out


def profile_markdown(arch: str, phases: dict, ops: dict) -> str:
    names = ["blend forward", "network forward + loss", "backward (network)", "backward (blend → coefficients)",
             "optimizer"]
    lines = [f"#### {arch}: phases of one step (median ms)", "",
             f"{phases['coefficients']:,} coefficients blend {phases['blended_values']:,} weight values per "
             f"source; fine-tune updates {phases['finetune_parameters']:,} parameters.", "",
             "| phase | fine-tune | kernel-weight | difference |", "|---|---:|---:|---:|"]
    totals = [0.0, 0.0]
    for name in names:
        ft = phases["finetune"].get(name, 0.0)
        kw = phases["kernel_weights"].get(name, 0.0)
        totals[0] += ft
        totals[1] += kw
        lines.append(f"| {name} | {ft:.1f} | {kw:.1f} | {kw - ft:+.1f} |")
    lines.append(f"| **sum** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | **{totals[1] - totals[0]:+.1f}** |")
    for variant, label in (("finetune", "fine-tune"), ("kernel_weights", "kernel-weight")):
        v = ops[variant]
        lines += ["", f"#### {arch}: top operators of one {label} step by {v['clock']} "
                  f"(total {v['total_ms']:.1f} ms)", "", "| operator | ms | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['ms']:.1f} | {o['share']:.0%} | {o['calls']} |" for o in v["ops"]]
    return "\n".join(lines)


def measure(args, runtime: Runtime) -> tuple[list[str], dict]:
    """The profile of each of ``args.arch``: its Markdown sections and the numbers behind them."""
    sections, raw = [], {}
    for arch in args.arch:
        phases, ops = phase_times(arch, args, runtime), top_ops(arch, args, runtime)
        raw[arch] = {"phases_ms": phases, "top_ops": ops}
        sections.append(profile_markdown(arch, phases, ops))
    return sections, raw


def main(argv: list[str] | None = None) -> None:
    from .suite import run_suite  # here, not above: the suite imports this module

    run_suite(["step_profile"], argv, __doc__)


if __name__ == "__main__":
    main()
