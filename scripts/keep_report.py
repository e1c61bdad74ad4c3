"""Keep a finished run's report beside the example it belongs to, as the pipeline wrote it.

    python scripts/keep_report.py RUN_DIR examples/pneumoniamnist/reports

Copies RUN_DIR's reports/comparison.md, comparison.csv, metrics.json, per_seed.csv and the plots
(comparison.png, differences.png, layerwise.png) unchanged into DEST, with RUN_DIR's params.yaml, and
writes DEST/run.json: the run's commit, the CPU model, its threads, CPU kernels and depthwise gradients, torch's version and the wall time
of its `dvc repro` when given (``--seconds``). Nothing in the copied files is edited.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPORTS = ["comparison.md", "comparison.csv", "metrics.json", "per_seed.csv", "comparison.png", "differences.png",
           "layerwise.png"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a repository after `dvc repro`")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seconds", type=float, help="wall time of the run's `dvc repro`")
    args = parser.parse_args()
    missing = [name for name in REPORTS if not (args.run_dir / "reports" / name).is_file()]
    if missing:
        print(f"{args.run_dir / 'reports'}: no {', '.join(missing)}; run `dvc repro` there first", file=sys.stderr)
        return 1
    import torch

    from medmerge.device import cpu_description

    args.dest.mkdir(parents=True, exist_ok=True)
    for name in REPORTS:
        shutil.copyfile(args.run_dir / "reports" / name, args.dest / name)
    shutil.copyfile(args.run_dir / "params.yaml", args.dest / "params.yaml")
    params = yaml.safe_load((args.run_dir / "params.yaml").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.run_dir, capture_output=True, text=True)
    run = {"commit": commit.stdout.strip() or None, "cpu": cpu_description(), "cpu_threads": params["device"]["cpu_threads"],
           "cpu_kernels": params["device"]["cpu_kernels"], "cpu_depthwise_grad": params["device"]["cpu_depthwise_grad"],
           "torch": torch.__version__,
           "dvc_repro_seconds": args.seconds}
    (args.dest / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
