"""Stage prepare@<dataset>: resize to data.image_size (the dataset's resize policy), 3 channels, uint8
memory-mappable splits + meta.json; image files are streamed from where the fetch manifest says."""

import argparse
import logging

from medmerge import layout
from medmerge.data.prepare import open_raw_dataset, prepare_dataset
from medmerge.stage import run, stage_params

log = logging.getLogger("medmerge.stages.prepare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    args = parser.parse_args()
    params, _ = stage_params()
    dataset = params.data.datasets[args.dataset]
    num_classes = len(dataset.classes) if dataset.classes else None
    raw = open_raw_dataset(layout.raw_file(args.dataset), num_classes=num_classes)
    meta = prepare_dataset(
        raw, params.data.image_size, layout.processed_dir(args.dataset), class_names=dataset.classes,
        resize=dataset.resize, workers=params.data.workers, allow_missing_classes=dataset.allow_missing_classes,
        train_fraction=dataset.train_fraction, n_train_per_class=dataset.n_train_per_class,
        subsample_seed=dataset.subsample_seed, train_subset=dataset.train_subset, ordinal=dataset.ordinal,
    )
    log.info("%s: %d classes, counts %s", args.dataset, meta["num_classes"], meta["counts"])


if __name__ == "__main__":
    run(main)
