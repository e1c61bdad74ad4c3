"""Several measurements in one process: one Markdown table of their ratios against targets.

  step_time          one kernel-weight learning step ÷ one plain full fine-tune step (same model, batch,
                     device); also the operators torch.profiler records per step. Target ≤ 1.0.
  loader_throughput  data-loader throughput alone ÷ training throughput of the model it feeds. Target ≥ 5.
  peak_memory        peak memory of kernel-weight learning ÷ that of fine-tuning. Target ≤ 1.5.
  stage_times        wall time of each stage of ``dvc repro`` in a fresh copy of the repository. No target.
  step_profile       where the time of one step goes (phases, top operators), printed after the table.

Every measurement alternates its variants and reports medians of repeated measurements.

    python -m benchmarks suite                              # step_time, loader_throughput, peak_memory
    python -m benchmarks suite --measure step_time loader_throughput peak_memory step_profile --json out.json
    python -m benchmarks suite --measure stage_times        # a full default `dvc repro` (~15 min on 2 cores)
    python -m benchmarks stage_times --params pretrain.epochs=1 finetune.epochs=1 merge.epochs=1
    python -m benchmarks suite --device cuda --size 224 --batch 128 --mixed-precision bf16 --channels-last on
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medmerge.device import resolve_runtime

from . import loader_throughput, peak_memory, stage_times, step_profile, step_time
from .results import environment, table

TABLE_MEASUREMENTS = {  # in the order they run; each returns its table rows and its raw numbers
    "step_time": step_time.table_rows,
    "loader_throughput": loader_throughput.measure,
    "peak_memory": peak_memory.measure,
    "stage_times": stage_times.measure,
}
MEASUREMENTS = [*TABLE_MEASUREMENTS, "step_profile"]
DEFAULT = ["step_time", "loader_throughput", "peak_memory"]


def parse_args(argv: list[str] | None, measurements: list[str] | None, description: str) -> argparse.Namespace:
    """The suite's options; with ``measurements`` fixed (one measurement run on its own) no ``--measure``."""
    prog = "python -m benchmarks " + (" ".join(measurements) if measurements else "suite")
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if measurements is None:
        parser.add_argument("--measure", nargs="+", choices=MEASUREMENTS, default=DEFAULT, metavar="NAME",
                            help=f"which measurements to run, of {', '.join(MEASUREMENTS)} "
                                 f"(default: {' '.join(DEFAULT)})")
    parser.add_argument("--arch", nargs="+", default=["resnet18", "tf_efficientnet_lite0"],
                        help="step_time, peak_memory, step_profile")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 64 on CPU, 224 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on CPU, 128 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed repeats per variant for step_time, loader_throughput, step_profile")
    parser.add_argument("--sources", type=int, default=2, help="source models merged")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--mixed-precision", default="auto", help="auto | none | bf16 | fp16")
    parser.add_argument("--channels-last", default="auto", help="auto | on | off")
    parser.add_argument("--loader-arch", default="tf_efficientnet_lite0",
                        help="loader_throughput: the model the loader feeds")
    parser.add_argument("--loader-images", type=int, default=2000,
                        help="loader_throughput: images in the prepared split")
    parser.add_argument("--device-cache-fraction", type=float, default=0.5,
                        help="loader_throughput: hold the split on a GPU if it fits in this fraction of its "
                             "free memory (data.device_cache_fraction; 0: never)")
    parser.add_argument("--memory-repeats", type=int, default=3, help="peak_memory: measurements per variant")
    parser.add_argument("--memory-steps", type=int, default=3, help="peak_memory: training steps per measurement")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stage_times: params.yaml overrides, e.g. merge.epochs=2")
    parser.add_argument("--jobs", type=int, default=0,
                        help="stage_times: 0 runs `dvc repro`; N runs `medmerge repro --jobs N` (stages side by side)")
    parser.add_argument("--json", type=Path, default=None, help="also save everything measured here")
    parser.add_argument("--verbose", action="store_true", help="stage_times: echo dvc's output with timestamps")
    args = parser.parse_args(argv)
    if measurements is not None:
        args.measure = measurements
    return args


def run_suite(measurements: list[str] | None, argv: list[str] | None = None, description: str = __doc__) -> None:
    """Run ``measurements`` (None: those ``--measure`` names) and print the table, then any step profile;
    ``description`` heads ``--help``."""
    args = parse_args(argv, measurements, description)
    runtime = resolve_runtime(args.device, args.mixed_precision, args.channels_last)
    on_cuda = runtime.device.type == "cuda"
    args.size = args.size or (224 if on_cuda else 64)
    args.batch = args.batch or (128 if on_cuda else 64)
    report = {"environment": environment(runtime), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []
    for name, measure in TABLE_MEASUREMENTS.items():
        if name in args.measure:
            new, report[name] = measure(args, runtime)
            rows += new
    profiles = []
    if "step_profile" in args.measure:
        profiles, report["step_profile"] = step_profile.measure(args, runtime)
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


def main(argv: list[str] | None = None) -> None:
    run_suite(None, argv)


if __name__ == "__main__":
    main()
