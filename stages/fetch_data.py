"""Stage fetch_data@<dataset>: write data/raw/<dataset>/<dataset>.npz from the dataset's origin."""

import argparse

from medmerge import layout
from medmerge.data.fetch import fetch_dataset
from medmerge.stage import run, stage_output, stage_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    args = parser.parse_args()
    params, _ = stage_params()
    dataset = params.data.datasets[args.dataset]
    with stage_output(layout.raw_dir(args.dataset)) as out:  # a failed fetch leaves no directory behind
        fetch_dataset(dataset.origin, dict(dataset.options), out / layout.raw_file(args.dataset).name,
                      classes=dataset.classes)


if __name__ == "__main__":
    run(main)
