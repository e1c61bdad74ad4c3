"""Data-loader throughput ÷ training throughput of the model it feeds (target ≥ 5).

The loader side: ``ArrayBatches`` over a memory-mapped prepared split of synthetic lesions (on a GPU held
there when it fits, as the stages do) plus the ``DeviceTransform`` (normalise + random flips), images per
second over one epoch. The training side: one full fine-tune step of ``--loader-arch`` on the same batch
size. One loader epoch and one training step alternate; medians of ``--repeats``. Runs in the suite
(``python -m benchmarks suite``); on its own, ``python -m benchmarks loader_throughput`` takes the suite's
options.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from medmerge.data import generate_synthetic, load_npz, load_split, prepare_dataset, save_npz_atomic
from medmerge.data.loader import ArrayBatches, place_on_device
from medmerge.device import Runtime
from medmerge.train import make_transform

from .results import row, runtime_label
from .step_time import build_variant, example_batch, make_step, sync

TARGET = (">=", 5.0)


def prepared_split(root: Path, images: int, size: int) -> tuple:
    """A memory-mapped prepared training split of ``images`` synthetic lesions at ``size`` px."""
    arrays = generate_synthetic("lesions", n_train=images, n_val=8, n_test=8, image_size=min(size, 64), seed=0)
    save_npz_atomic(root / "raw.npz", arrays)
    prepare_dataset(load_npz(root / "raw.npz"), size, root / "prepared")
    return load_split(root / "prepared", "train", mmap=True)


def measure(args, runtime: Runtime) -> tuple[list[dict], dict]:
    arch = args.loader_arch
    with tempfile.TemporaryDirectory(prefix="medmerge-bench-") as tmp:
        start = time.perf_counter()
        images, labels = prepared_split(Path(tmp), args.loader_images, args.size)
        print(f"loader_throughput: prepared {len(images)} images at {args.size} px in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
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
    print(f"loader_throughput {arch}: loader {loader_ips:,.0f} img/s, training {train_ips:,.0f} img/s, "
          f"ratio {ratio:.1f}", file=sys.stderr, flush=True)
    raw = {"arch": arch, "images": args.loader_images, "batches_per_epoch": len(batches), "where": where,
           "loader_images_per_s": loader_ips, "train_images_per_s": train_ips, "ratio": ratio}
    measured = f"{loader_ips:,.0f} ÷ {train_ips:,.0f} img/s"
    config = f"{runtime_label(runtime, args.size, args.batch)}; {args.loader_images} images, {where}"
    return [row("loader_throughput", f"loader ÷ training throughput (fine-tune step), {arch}", config, measured,
                ratio, TARGET)], raw


def main(argv: list[str] | None = None) -> None:
    from .suite import run_suite  # here, not above: the suite imports this module

    run_suite(["loader_throughput"], argv, __doc__)


if __name__ == "__main__":
    main()
