"""The rows of the benchmark suite's table: one measured ratio against its target, the machine it ran on."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch

from medmerge.device import Runtime, cpu_description


def row(benchmark: str, what: str, config: str, measured: str, ratio: float | None,
        target: tuple[str, float] | None = None, **extra) -> dict:
    """One row of the table; ``target`` is ``("<=", bound)`` or ``(">=", bound)``, None where there is none."""
    result = "—"
    if target is not None and ratio is not None:
        op, bound = target
        result = "pass" if (ratio <= bound if op == "<=" else ratio >= bound) else "miss"
    return {
        "benchmark": benchmark, "measurement": what, "config": config, "measured": measured, "ratio": ratio,
        "target": f"{'≤' if target[0] == '<=' else '≥'} {target[1]:.1f}" if target else "—",
        "result": result,
        **extra,
    }


def runtime_label(runtime: Runtime, size: int, batch: int) -> str:
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[runtime.amp_dtype]
    layout = ", channels_last" if runtime.channels_last else ""
    return f"{runtime.device.type}, {size} px, batch {batch}, {precision}{layout}"


def environment(runtime: Runtime | None) -> dict:
    device = "cpu"
    if runtime is not None and runtime.device.type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = cpu_description()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| | measurement | config | measured | ratio | target | result |", "|---|---|---|---|---:|---|---|"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['benchmark']} | {r['measurement']} | {r['config']} | {r['measured']} | {ratio} | "
                     f"{r['target']} | {r['result']} |")
    return "\n".join(lines)
