"""MedMerge's benchmarks in one script and one process; prints one Markdown table of ratios vs targets.

  (a) step time: one kernel-weight learning step / one plain full fine-tune step (same model, batch,
      device), from ``step_time.measure``. Target <= 1.0.
  (b) data-loader throughput alone (``ArrayBatches`` over a memory-mapped prepared split plus the
      ``DeviceTransform``: normalise + random flips) / training throughput of the model it feeds (one
      full fine-tune step of ``--loader-arch`` on the same batch size). Target >= 5.
  (c) peak memory of kernel-weight learning / that of fine-tuning. CUDA: ``max_memory_allocated`` in
      this process. CPU: each variant in a fresh child process, its peak RSS (VmHWM). Two rows:
      "whole" = peak - the process's memory before the model is built (model/source tensors + one
      training step); "step only" = peak - memory right after the model is built. Target <= 1.5.
  (d) with ``--stages``: wall time of each stage of ``dvc repro`` on the default params (or ``--params``
      overrides) in a fresh copy of the repository. No target.

Every measurement alternates its variants and reports medians of repeated measurements. ``--profile``
adds where the time of one step goes (phase timings and the top operators by self time).

    python benchmarks/run.py                               # (a)-(c) on this machine's defaults (CPU: 64 px, batch 64)
    python benchmarks/run.py --profile --json out.json     # ... plus the step profile, saved as JSON too
    python benchmarks/run.py --parts d                     # (d) only: a full default `dvc repro` (~6 min on 2 cores)
    python benchmarks/run.py --stages --params pretrain.epochs=1 finetune.epochs=1 merge.epochs=1
    python benchmarks/run.py --device cuda --size 224 --batch 128 --mixed-precision bf16 --channels-last on
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from step_time import make_step, measure, sources_for, sync
from torch import nn
from torch.func import functional_call

from medmerge.config import MergeSettings
from medmerge.data import generate_synthetic, load_npz, load_split, prepare_dataset, save_npz_atomic
from medmerge.data.loader import ArrayBatches, place_on_device
from medmerge.device import Runtime, resolve_runtime
from medmerge.models import create_model
from medmerge.pipeline import build_kernel_merge, make_transform
from medmerge.testing import copy_repo, init_repo

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4
VARIANTS = ("finetune", "kernel_weights")
TARGETS = {"a": ("<=", 1.0), "b": (">=", 5.0), "c": ("<=", 1.5)}


# ---------------------------------------------------------------- shared pieces


def build_variant(arch: str, variant: str, runtime: Runtime, num_sources: int) -> tuple[nn.Module, list]:
    """The model and learnable parameters of one variant, exactly as ``step_time.measure`` builds them."""
    if variant == "finetune":
        model = runtime.prepare(create_model(arch, num_classes=CLASSES)).train()
        return model, list(model.parameters())
    names = [f"s{i}" for i in range(num_sources)]
    merge = build_kernel_merge(arch, sources_for(arch, num_sources), names, CLASSES, MergeSettings(anchor="s0"))
    merge = runtime.prepare(merge).train()
    groups = merge.learnable_groups()
    return merge, groups["coefficients"] + groups["head"]


def example_batch(size: int, batch: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=runtime.device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, CLASSES, (batch,), device=runtime.device)


def verdict(part: str, ratio: float) -> str:
    op, target = TARGETS[part]
    ok = ratio <= target if op == "<=" else ratio >= target
    return "pass" if ok else "miss"


def row(part: str, what: str, config: str, measured: str, ratio: float | None, **extra) -> dict:
    target = TARGETS.get(part)
    return {
        "part": part, "measurement": what, "config": config, "measured": measured, "ratio": ratio,
        "target": f"{'≤' if target[0] == '<=' else '≥'} {target[1]:.1f}" if target else "—",
        "result": verdict(part, ratio) if target and ratio is not None else "—",
        **extra,
    }


def runtime_label(runtime: Runtime, size: int, batch: int) -> str:
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[runtime.amp_dtype]
    layout = ", channels_last" if runtime.channels_last else ""
    return f"{runtime.device.type}, {size} px, batch {batch}, {precision}{layout}"


# ---------------------------------------------------------------- (a) step time


def part_a(args, runtime: Runtime) -> tuple[list[dict], list[dict]]:
    rows, raw = [], []
    for arch in args.arch:
        r = measure(arch, args.size, args.batch, args.repeats, runtime, args.sources)
        raw.append(r)
        config = runtime_label(runtime, args.size, args.batch)
        rows.append(row(
            "a", f"step time, kernel-weight ÷ fine-tune, {arch}", config,
            f"{r['kernel_weights_s'] * 1e3:.1f} ms ÷ {r['finetune_s'] * 1e3:.1f} ms", r["ratio"],
        ))
        if runtime.device.type == "cpu":
            rows.append(row(
                "a", f"CPU time per step, kernel-weight ÷ fine-tune, {arch}", config,
                f"{r['kernel_weights_cpu_s'] * 1e3:.1f} ms ÷ {r['finetune_cpu_s'] * 1e3:.1f} ms", r["cpu_ratio"],
            ))
        for what, label in (("operators", "operators"), ("leaf_operators", "leaf operators"),
                            ("kernel_launches", "CUDA kernel launches")):
            finetune, kernel = r[f"finetune_{what}"], r[f"kernel_weights_{what}"]
            if finetune:
                rows.append(row("a", f"{label} per step (torch.profiler), kernel-weight ÷ fine-tune, {arch}", config,
                                f"{kernel:,.0f} ÷ {finetune:,.0f}", kernel / finetune))
        print(f"(a) {arch}: {r['ratio']:.3f}; operators {r['kernel_weights_operators']:.0f} vs "
              f"{r['finetune_operators']:.0f}", file=sys.stderr, flush=True)
    return rows, raw


# ---------------------------------------------------------------- (b) loader vs training throughput


def prepared_split(root: Path, images: int, size: int) -> tuple:
    """A memory-mapped prepared training split of ``images`` synthetic lesions at ``size`` px."""
    arrays = generate_synthetic("lesions", n_train=images, n_val=8, n_test=8, image_size=min(size, 64), seed=0)
    save_npz_atomic(root / "raw.npz", arrays)
    prepare_dataset(load_npz(root / "raw.npz"), size, root / "prepared")
    return load_split(root / "prepared", "train", mmap=True)


def part_b(args, runtime: Runtime) -> tuple[list[dict], dict]:
    arch = args.loader_arch
    with tempfile.TemporaryDirectory(prefix="medmerge-bench-") as tmp:
        start = time.perf_counter()
        images, labels = prepared_split(Path(tmp), args.loader_images, args.size)
        print(f"(b) prepared {len(images)} images at {args.size} px in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
        batches = ArrayBatches(images, labels, batch_size=args.batch, shuffle=True, seed=0, drop_last=True)
        batches = place_on_device([batches], runtime.device, args.device_cache_fraction)[0]  # as the stages do
        where = "held on the device" if batches.device_images is not None else "memory-mapped"
        transform = make_transform(arch, runtime)
        model, params = build_variant(arch, "finetune", runtime, args.sources)
        step = make_step(model, params, runtime)
        x, y = example_batch(args.size, args.batch, runtime)

        def loader_epoch() -> float:
            """Seconds per image over one epoch: gather + to device + normalise + flips."""
            begin = time.perf_counter()
            seen = 0
            for images_u8, targets in batches:
                xb = transform(images_u8, augment=True)
                targets.to(runtime.device, non_blocking=True)
                seen += len(xb)
            sync(runtime)
            return (time.perf_counter() - begin) / seen

        def train_step() -> float:
            begin = time.perf_counter()
            step(x, y)
            sync(runtime)
            return (time.perf_counter() - begin) / args.batch

        loader_epoch()  # warm-up: page cache, allocator
        for _ in range(2):
            step(x, y)
        sync(runtime)
        loader_s, train_s = [], []
        for _ in range(args.repeats):  # alternate: one loader epoch, then one training step
            loader_s.append(loader_epoch())
            train_s.append(train_step())
        loader_ips = 1.0 / statistics.median(loader_s)
        train_ips = 1.0 / statistics.median(train_s)
    ratio = loader_ips / train_ips
    print(f"(b) {arch}: loader {loader_ips:,.0f} img/s, training {train_ips:,.0f} img/s, ratio {ratio:.1f}",
          file=sys.stderr, flush=True)
    raw = {"arch": arch, "images": args.loader_images, "batches_per_epoch": len(batches), "where": where,
           "loader_images_per_s": loader_ips, "train_images_per_s": train_ips, "ratio": ratio}
    measured = f"{loader_ips:,.0f} ÷ {train_ips:,.0f} img/s"
    config = f"{runtime_label(runtime, args.size, args.batch)}; {args.loader_images} images, {where}"
    return [row("b", f"loader ÷ training throughput (fine-tune step), {arch}", config, measured, ratio)], raw


# ---------------------------------------------------------------- (c) peak memory


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes(resettable: bool) -> int:
    if resettable:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, never reset


def _trim() -> None:
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
    _trim()
    resettable = _reset_peak()
    before = _status_kib("VmRSS") * 1024
    model, params = build_variant(spec["arch"], spec["variant"], runtime, spec["sources"])
    _trim()
    built, built_peak = _status_kib("VmRSS") * 1024, _peak_bytes(resettable)
    resettable = resettable and _reset_peak()
    step = make_step(model, params, runtime)
    for _ in range(spec["steps"]):
        step(x, y)
    peak = _peak_bytes(resettable)
    return {"before": before, "built": built, "built_peak": built_peak, "peak": peak, "hwm_reset": resettable}


def cpu_peak(arch: str, variant: str, args) -> dict:
    spec = {"arch": arch, "variant": variant, "size": args.size, "batch": args.batch, "sources": args.sources,
            "steps": args.memory_steps, "threads": torch.get_num_threads()}
    result = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child {arch}/{variant} failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.strip().splitlines()[-1])
    if r["built_peak"] > r["peak"]:
        print(f"(c) note: {arch}/{variant}: building peaked higher ({r['built_peak'] - r['before']:,} bytes) "
              "than training", file=sys.stderr)
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


def part_c(args, runtime: Runtime) -> tuple[list[dict], list[dict]]:
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
            rows.append(row("c", f"peak memory ({label}), kernel-weight ÷ fine-tune, {arch}",
                            f"{runtime_label(runtime, args.size, args.batch)}; {how}", measured, ratio))
            print(f"(c) {arch} {key}: {ratio:.3f}", file=sys.stderr, flush=True)
    return rows, raw


# ---------------------------------------------------------------- (d) stage wall times


def set_dotted(params: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--params takes key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = yaml.safe_load(value)


def stage_env() -> dict:
    """This venv first, offline, no inherited MLflow/DVC state; torch threads as the machine gives them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    return env


def part_d(args) -> tuple[list[dict], dict]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for assignment in args.params:
        set_dotted(params, assignment)
    env = stage_env()
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    with tempfile.TemporaryDirectory(prefix="medmerge-stages-") as tmp:
        root = copy_repo(Path(tmp), params)  # the same scratch repository the end-to-end tests use
        init_repo(root, env, "benchmark")
        events: list[tuple[float, str]] = []  # (seconds since start, stage name)
        tail: list[str] = []
        start = time.perf_counter()
        with subprocess.Popen([dvc, "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                now = time.perf_counter() - start
                tail = (tail + [line.rstrip()])[-40:]
                if args.verbose:
                    print(f"[{now:7.1f}s] {line.rstrip()}", file=sys.stderr, flush=True)
                match = re.search(r"Running stage '([^']+)'", line)
                if match:
                    events.append((now, match.group(1)))
                    print(f"(d) [{now:6.1f}s] {match.group(1)}", file=sys.stderr, flush=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro failed ({proc.returncode}):\n" + "\n".join(tail))
    ends = [t for t, _ in events[1:]] + [total]
    stages = {name: end - begin for (begin, name), end in zip(events, ends, strict=True)}
    overrides = " ".join(args.params) if args.params else "default params"
    config = f"`dvc repro`, {overrides}; {torch.get_num_threads()} torch threads"
    rows = [row("d", f"stage `{name}`", config, f"{seconds:.1f} s", None) for name, seconds in stages.items()]
    rows.append(row("d", "DVC start-up before the first stage", config, f"{events[0][0] if events else total:.1f} s",
                    None))
    rows.append(row("d", "**whole `dvc repro`**", config, f"{total:.1f} s", None))
    return rows, {"params": args.params, "stages_s": stages, "total_s": total}


# ---------------------------------------------------------------- profile of one step


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


# ---------------------------------------------------------------- output


def environment(runtime: Runtime | None) -> dict:
    device = "cpu"
    if runtime is not None and runtime.device.type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        try:
            model_names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")]
            device = model_names[0] if model_names else platform.processor()
        except OSError:
            device = platform.processor()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| | measurement | config | measured | ratio | target | result |", "|---|---|---|---|---:|---|---|"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| ({r['part']}) | {r['measurement']} | {r['config']} | {r['measured']} | {ratio} | "
                     f"{r['target']} | {r['result']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="abc", help="which of a, b, c, d to run, or none")
    parser.add_argument("--arch", nargs="+", default=["resnet18", "tf_efficientnet_lite0"], help="(a), (c), profile")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 64 on CPU, 224 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on CPU, 128 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per variant for (a), (b), profile")
    parser.add_argument("--sources", type=int, default=2, help="source models merged")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--mixed-precision", default="auto", help="auto | none | bf16 | fp16")
    parser.add_argument("--channels-last", default="auto", help="auto | on | off")
    parser.add_argument("--loader-arch", default="tf_efficientnet_lite0", help="(b): the model the loader feeds")
    parser.add_argument("--loader-images", type=int, default=2000, help="(b): images in the prepared split")
    parser.add_argument("--device-cache-fraction", type=float, default=0.5,
                        help="(b): hold the split on a GPU if it fits in this fraction of its free memory "
                             "(data.device_cache_fraction; 0: never)")
    parser.add_argument("--memory-repeats", type=int, default=3, help="(c): measurements per variant")
    parser.add_argument("--memory-steps", type=int, default=3, help="(c): training steps per measurement")
    parser.add_argument("--stages", action="store_true", help="add (d): a full `dvc repro` in a temporary copy")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="(d): params.yaml overrides, e.g. merge.epochs=2")
    parser.add_argument("--profile", action="store_true", help="profile one step of each variant")
    parser.add_argument("--json", type=Path, default=None, help="also save everything measured here")
    parser.add_argument("--verbose", action="store_true", help="(d): echo dvc's output with timestamps")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    parts = set() if args.parts == "none" else set(args.parts)
    if parts - set("abcd"):
        raise SystemExit(f"--parts takes letters of 'abcd' (or 'none'), got {args.parts!r}")
    if args.stages:
        parts.add("d")
    runtime = resolve_runtime(args.device, args.mixed_precision, args.channels_last)
    on_cuda = runtime.device.type == "cuda"
    args.size = args.size or (224 if on_cuda else 64)
    args.batch = args.batch or (128 if on_cuda else 64)
    report = {"environment": environment(runtime), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []
    if "a" in parts:
        new, report["a"] = part_a(args, runtime)
        rows += new
    if "b" in parts:
        new, report["b"] = part_b(args, runtime)
        rows += new
    if "c" in parts:
        new, report["c"] = part_c(args, runtime)
        rows += new
    if "d" in parts:
        new, report["d"] = part_d(args)
        rows += new
    profiles = []
    if args.profile:
        report["profile"] = {}
        for arch in args.arch:
            phases, ops = phase_times(arch, args, runtime), top_ops(arch, args, runtime)
            report["profile"][arch] = {"phases_ms": phases, "top_ops": ops}
            profiles.append(profile_markdown(arch, phases, ops))
    env = report["environment"]
    env["load_average_1min_end"] = os.getloadavg()[0]
    print(f"\n{env['date']}: {env['device']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads, "
          f"torch {env['torch']}, Python {env['python']}; load average {env['load_average_1min']:.2f} at the "
          f"start, {env['load_average_1min_end']:.2f} at the end\n")
    print(table(rows))
    for text in profiles:
        print("\n" + text)
    report["rows"] = rows
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nsaved {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
