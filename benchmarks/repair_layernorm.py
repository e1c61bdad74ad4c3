"""The effect of alignment and REPAIR on a LayerNorm backbone (ConvNeXt).

Two independently initialised sources trained briefly on a synthetic task (``shapes`` by default), merged
by the plain average (a linear-probe head on the collapsed model), with and without weight-matching
alignment and with and without REPAIR. Prints a Markdown table of validation / test accuracy and macro
F1. Usage:

    python -m benchmarks repair_layernorm                       # convnext_atto, 32 px, 3 epochs per source
    python -m benchmarks repair_layernorm --arch test_convnext --size 64 --epochs 8 --threads 1
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from medmerge.config import MergeSettings, TrainSettings
from medmerge.data.loader import ArrayBatches
from medmerge.data.synthetic import generate_synthetic
from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.merge.alignment import align_sources
from medmerge.merge.collapse import collapse
from medmerge.methods import MergeInputs, run_merge_method
from medmerge.metrics import classification_metrics
from medmerge.models import create_model, model_state_cpu
from medmerge.train import make_transform, predict, train_classifier


def dataset(task: str, size: int, n_train: int) -> TargetData:
    arrays = generate_synthetic(task, n_train, 200, 400, image_size=size, seed=101)
    split = {name: (arrays[f"{name}_images"], arrays[f"{name}_labels"][:, 0].astype(np.int64))
             for name in ("train", "val", "test")}
    return TargetData(train=ArrayBatches(*split["train"], batch_size=32, shuffle=True, seed=0, drop_last=True),
                      val=ArrayBatches(*split["val"], batch_size=200), test=ArrayBatches(*split["test"], batch_size=200),
                      classes=[str(c) for c in arrays["class_names"]])


def scores(model, arch: str, data: TargetData, runtime: Runtime) -> dict:
    out = {}
    for split in ("val", "test"):
        probabilities, labels = predict(model, getattr(data, split), make_transform(arch, runtime))
        metrics = classification_metrics(labels, probabilities, data.classes)
        out[split] = (metrics["accuracy"], metrics["f1_macro"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks repair_layernorm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="convnext_atto")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--task", default="shapes", help="a synthetic task (medmerge.data.synthetic)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runtime = Runtime(torch.device("cpu"))
    data = dataset(args.task, args.size, args.n_train)
    train = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=32, optimizer="adamw", augment=True)
    names, sources, rows = ["a", "b"], [], []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        init = create_model(args.arch, num_classes=data.num_classes).state_dict()
        model, _ = train_classifier(args.arch, init, data, train, runtime, seed=seed, keep_head=True,
                                    description=f"source {name}")
        sources.append(model_state_cpu(model))
        rows.append((f"source {name}", scores(model.eval(), args.arch, data, runtime)))
    aligned, _, report = align_sources(args.arch, sources, names, anchor="a")
    print(f"load average {os.getloadavg()[0]:.2f}; alignment similarity {report['b']}")
    for align, states in (("none", sources), ("weight_matching", aligned)):
        for repair in (False, True):
            settings = MergeSettings(method="average", anchor="a", align=align, repair=repair, bn_recalibration=False)
            result = run_merge_method(MergeInputs(args.arch, states, names, data, settings, runtime))
            model = collapse(result.merge, args.arch, data.num_classes, None, runtime,
                             repair_data=data if repair else None)
            rows.append((f"average, align {align}, REPAIR {'on' if repair else 'off'}",
                         scores(model, args.arch, data, runtime)))
    print(f"\n{args.arch} at {args.size} px, {args.epochs} epochs per source on {args.n_train} '{args.task}' images\n")
    print("| model | val accuracy | val macro F1 | test accuracy | test macro F1 |")
    print("|---|---|---|---|---|")
    for label, s in rows:
        print(f"| {label} | {s['val'][0]:.3f} | {s['val'][1]:.3f} | {s['test'][0]:.3f} | {s['test'][1]:.3f} |")


if __name__ == "__main__":
    main()
