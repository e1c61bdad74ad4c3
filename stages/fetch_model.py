"""Stage fetch_model@<source>: the source's starting weights as models/sources/<source>/ (safetensors + card)."""

import argparse
import logging

from medmerge import layout
from medmerge.models import check_backbone, create_model, fetch_weights, head_keys, save_model_dir
from medmerge.stage import run, stage_params

log = logging.getLogger("medmerge.stages.fetch_model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    args = parser.parse_args()
    params, _ = stage_params()
    source = params.sources[args.source]
    state, info = fetch_weights(source.arch, source.origin, dict(source.options))
    model = create_model(source.arch, num_classes=1)
    report = check_backbone(model, state)  # every backbone key present with its shape, or a clear error
    head = [key for key in head_keys(model) if key in state]
    num_classes = int(state[head[0]].shape[0]) if head else 0
    log.info("%s: %d tensors, backbone complete; source head %s (%d classes) is replaced downstream",
             args.source, len(state), report.unexpected or "absent", num_classes)
    card = {"arch": source.arch, "num_classes": num_classes, "source": args.source, "stage": "fetch_model",
            "source_head_keys": report.unexpected, **info}
    save_model_dir(layout.SOURCES / args.source, state, card)


if __name__ == "__main__":
    run(main)
