"""Stage teachers@<method>-<seed>: the FT baselines merge ``methods.<method>`` learns from, if its method does.

For a method that learns from the FT ensemble (``needs_teachers``: distill), copies seed ``n``'s FT baselines
of every source (models/ft/seed_<n>/<source>) to models/teachers/<method>/seed_<n>/<source>; for any other
method it writes only teachers.json saying there are none. ``learn@<method>-<seed>`` depends on this
directory instead of models/ft, so a change of the FT baselines (``-S finetune.lr=...``) relearns only the
merges that learn from them. Cheap: no torch.
"""

import shutil

from medmerge import layout
from medmerge.io import write_json
from medmerge.methods import get_method
from medmerge.stage import merge_stage_arguments, run, stage_output, stage_params


def main() -> None:
    args = merge_stage_arguments(__doc__)
    params, _ = stage_params()
    needs_teachers = get_method(params.method(args.method).method).needs_teachers
    names = params.source_names if needs_teachers else []
    with stage_output(layout.seed_dir(layout.TEACHERS / args.method, args.seed)) as out:
        for name in names:
            shutil.copytree(layout.source_dir("ft", name, args.seed), out / name)
        write_json(out / "teachers.json", {"method": args.method, "teachers": names,
                                           "from": str(layout.seed_dir(layout.MODELS / "ft", args.seed))})


if __name__ == "__main__":
    run(main)
