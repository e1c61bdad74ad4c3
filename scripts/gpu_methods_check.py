"""Every merge method, the linear probe (LP-FT) and weight-matching alignment on the device's runtime.

A smoke check of the GPU code paths added with the method comparison: bf16 autocast, channels_last,
features for the probe under autocast, merges on CUDA. Random 4-class data at ``--size`` px. Prints one line
per step with its wall time. scripts/device_check.sh runs it after the benchmark; on its own:

    python scripts/gpu_methods_check.py --size 224 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medmerge.config import MergeSettings, TrainSettings
from medmerge.data.loader import ArrayBatches
from medmerge.data.target import TargetData
from medmerge.device import resolve_runtime
from medmerge.merge.alignment import align_sources
from medmerge.merge.collapse import collapse
from medmerge.methods import MergeInputs, run_merge_method
from medmerge.models import create_model
from medmerge.scoring import score_test_split
from medmerge.train import train_classifier


def task(size: int, classes: int = 4, train: int = 256, val: int = 128) -> TargetData:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % classes
        images = np.clip(rng.normal(40 + 50 * labels[:, None, None, None], 30, (n, size, size, 3)), 0, 255)
        return images.astype(np.uint8), labels

    return TargetData(ArrayBatches(*split(train), batch_size=64, shuffle=True, seed=0, drop_last=True),
                      ArrayBatches(*split(val), batch_size=128), ArrayBatches(*split(val), batch_size=128),
                      [f"c{i}" for i in range(classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    runtime = resolve_runtime(args.device, "auto", "auto", False)
    print(f"runtime: {runtime.device}, autocast {runtime.amp_dtype}, channels_last {runtime.channels_last}")
    data = task(args.size)
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sources.append(create_model(args.arch, num_classes=5).state_dict())
    names = ["a", "b"]

    def timed(label: str, fn):
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{label:<34} {time.perf_counter() - start:7.2f} s")
        return result

    aligned, _, report = timed("align (weight matching, CPU)", lambda: align_sources(args.arch, sources, names, "a"))
    print(f"  similarity {report['b']['similarity_before']:.4g} -> {report['b']['similarity_after']:.4g}")
    for method, extra in [("average", {}), ("interpolate", {"alphas": [0.0, 0.5, 1.0]}),
                          ("medmerge", {"epochs": 2}), ("medmerge aligned", {"epochs": 2})]:
        settings = MergeSettings(method=method.split()[0], anchor="a", batch_size=64, lr=0.1, **extra)
        states = aligned if "aligned" in method else sources
        result = timed(method, lambda s=settings, st=states: run_merge_method(
            MergeInputs(args.arch, st, names, data, s, runtime, seed=0)))
        model = collapse(result.merge.cpu(), args.arch, data.num_classes, data, runtime)
        f1 = score_test_split(model, args.arch, data, runtime)["f1_macro"]
        print(f"  val F1 {result.val_f1:.3f}, test F1 {f1:.3f}, {result.details}")
    settings = TrainSettings(epochs=2, lr=1e-3, batch_size=64)
    model, history = timed("LP-FT (2 epochs)", lambda: train_classifier(args.arch, sources[0], data, settings, runtime,
                                                                        linear_probe=True))
    print(f"  val F1 per epoch {[round(e.val_f1_macro, 3) for e in history.epochs]}")


if __name__ == "__main__":
    main()
