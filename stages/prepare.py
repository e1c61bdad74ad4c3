"""Stage prepare@<dataset>: resize to data.image_size, 3 channels, uint8 memory-mappable splits + meta.json."""

import argparse
import logging

from medmerge import layout
from medmerge.data.npz import load_npz
from medmerge.data.prepare import prepare_dataset
from medmerge.stage import run, stage_params

log = logging.getLogger("medmerge.stages.prepare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    args = parser.parse_args()
    params, _ = stage_params()
    dataset = params.data.datasets[args.dataset]
    num_classes = len(dataset.classes) if dataset.classes else None
    raw = load_npz(layout.raw_file(args.dataset), num_classes=num_classes)
    meta = prepare_dataset(raw, params.data.image_size, layout.processed_dir(args.dataset), class_names=dataset.classes)
    log.info("%s: %d classes, counts %s", args.dataset, meta["num_classes"], meta["counts"])


if __name__ == "__main__":
    run(main)
