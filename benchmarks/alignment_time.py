"""Weight-matching alignment time per architecture.

Two independent random timm models, one aligned onto the other. Prints a Markdown table (spaces, tracing
time, matching wall and CPU time, weight similarity before -> after). Usage:

    python -m benchmarks alignment_time                        # every supported family, default sizes
    python -m benchmarks alignment_time --arch resnet50 --threads 2

Run it on an otherwise idle machine: the table header prints the load average at the start and at the end.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from medmerge.merge.alignment import (
    alignment_similarity,
    apply_permutations,
    permutation_spec,
    weight_matching,
)
from medmerge.models import create_model

ARCHS = ["resnet18", "resnet50", "tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_small_100", "densenet121",
         "vgg16", "resnext26ts", "regnety_002", "seresnext26d_32x4d", "convnext_atto", "vit_tiny_patch16_224"]


def measure(arch: str, size: int) -> dict:
    torch.manual_seed(0)
    anchor = create_model(arch, num_classes=10)
    torch.manual_seed(1)
    other = create_model(arch, num_classes=10)
    start = time.perf_counter()
    spec = permutation_spec(anchor, None if arch.startswith("vit") else (3, size, size))
    trace_s = time.perf_counter() - start
    a, b = anchor.state_dict(), other.state_dict()
    start, cpu = time.perf_counter(), time.process_time()
    perms = weight_matching(spec, a, b)
    match_s, match_cpu = time.perf_counter() - start, time.process_time() - cpu
    aligned = apply_permutations(spec, perms, b)
    return {"arch": arch, "spaces": len(spec.spaces), "trace_s": trace_s, "match_s": match_s, "match_cpu_s": match_cpu,
            "before": alignment_similarity(spec, a, b), "after": alignment_similarity(spec, a, aligned)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks alignment_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=ARCHS)
    parser.add_argument("--size", type=int, default=64, help="dummy input size for tracing CNNs (ViTs use theirs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average at start {os.getloadavg()[0]:.2f}\n")
    print("| architecture | spaces | trace (s) | matching (s) | matching CPU (s) | similarity before -> after |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch:
        r = measure(arch, args.size)
        print(f"| {r['arch']} | {r['spaces']} | {r['trace_s']:.1f} | {r['match_s']:.1f} | {r['match_cpu_s']:.1f} | "
              f"{r['before']:.4g} -> {r['after']:.4g} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
