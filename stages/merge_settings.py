"""Stage merge_settings@<method>: what each step of merge ``methods.<method>`` reads of its settings.

Reads ``merge`` and ``methods.<method>`` (validated with everything else by ``load_params``) and writes
models/settings/<method>/learn.json, collapse.json and finetune.json: the keys that its learning (its
method's own keys and the shared ones it reads), its collapse and its fine-tune read
(:func:`medmerge.methods.step_settings`). The learn, collapse and finetune_merged stages depend on these
files, not on the whole ``merge`` section, so ``dvc exp run -S merge.lr=...`` reruns the learned merges
only, and ``-S merge.finetune_epochs=...`` no learning. Cheap: no torch.
"""


from medmerge import layout
from medmerge.io import write_json
from medmerge.methods import step_settings
from medmerge.stage import merge_stage_arguments, run, stage_output, stage_params


def main() -> None:
    args = merge_stage_arguments(__doc__, seed=False)
    params, _ = stage_params()
    steps = step_settings(params.method(args.method))
    with stage_output(layout.SETTINGS / args.method) as out:
        for step, values in steps.items():
            write_json(out / f"{step}.json", values)


if __name__ == "__main__":
    run(main)
