"""Stage fetch_model@<source>: the source's starting weights as models/sources/<source>/ (safetensors + card)."""

import argparse

from medmerge import layout
from medmerge.models import create_model, fetch_weights, head_keys, save_model_dir
from medmerge.stage import run, stage_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    args = parser.parse_args()
    params, _ = stage_params()
    source = params.sources[args.source]
    state, info = fetch_weights(source.arch, source.origin, dict(source.options))
    head = [key for key in head_keys(create_model(source.arch, num_classes=1)) if key in state]
    num_classes = int(state[head[0]].shape[0]) if head else 0
    card = {"arch": source.arch, "num_classes": num_classes, "source": args.source, "stage": "fetch_model", **info}
    save_model_dir(layout.SOURCES / args.source, state, card)


if __name__ == "__main__":
    run(main)
