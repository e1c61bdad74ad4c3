"""How many seeds do the verdicts need to hold on another machine? Two runs, every subset of their seeds.

Each run is a repository directory after ``dvc repro`` (e.g. the same commit natively and with training held
to AVX2). For every size k from 2 to the number of seeds both runs have, and every k-subset of those seeds,
each run's comparison is recomputed on that subset exactly as ``evaluate`` does it (the reference chosen on
validation among the baselines, paired differences, t and bootstrap intervals, verdicts, with the first
run's ``evaluate`` settings), and the two runs' verdicts are compared. The per-seed models do not depend on
the seed list (one DVC stage per seed), so a k-subset is what a run with ``seeds`` = that subset reports.
Prints Markdown: per k, the subsets on which every verdict agrees, and which methods flipped how often.

    python scripts/verdict_stability.py ../run-native ../run-avx2 --labels native AVX2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medmerge.compare import choose_reference, paired_difference, resample_weights, score  # noqa: E402
from medmerge.config import EvaluateSettings, load_params  # noqa: E402

Splits = Mapping[str, Mapping[int, Mapping[str, object]]]  # method -> seed -> split -> SplitPredictions
Verdicts = dict[tuple[int, ...], dict[str, str]]  # seed subset -> method -> verdict


class Run(NamedTuple):
    """One run's predictions of every evaluated method, its baselines' names, seeds and evaluate settings."""

    predictions: Splits
    baselines: list[str]
    seeds: list[int]
    settings: EvaluateSettings


@contextlib.contextmanager
def inside(root: Path) -> Iterator[None]:
    """Run with ``root`` as the working directory (the pipeline's paths are relative to the repository)."""
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(previous)


def load_run(root: Path) -> Run:
    """The run in repository directory ``root``, as ``evaluate`` reads it."""
    from medmerge.evaluation import evaluated_methods, gather_predictions

    if not (root / "params.yaml").is_file():
        raise SystemExit(f"{root / 'params.yaml'}: not found; give a repository directory after `dvc repro`")
    with inside(root):
        params = load_params("params.yaml")
        methods = evaluated_methods(params)
        predictions = gather_predictions(methods, list(params.seeds))
    return Run(predictions, [m.name for m in methods if m.baseline], list(params.seeds), params.evaluate)


def subset_verdicts(predictions: Splits, baselines: Sequence[str], subsets: Sequence[tuple[int, ...]],
                    settings: EvaluateSettings) -> Verdicts:
    """Every method's verdict on each subset of seeds, as ``evaluate`` would report it for those seeds."""
    first = next(iter(predictions.values()))
    seed = next(iter(first))
    labels = {split: first[seed][split].labels for split in ("val", "test")}
    num_classes = first[seed]["test"].logits.shape[1]
    weights = resample_weights(len(labels["test"]), settings.bootstrap, settings.bootstrap_seed)
    val_scores = {name: {s: score(labels["val"], splits["val"].predicted, num_classes, settings.metric)
                         for s, splits in by_seed.items()}
                  for name, by_seed in predictions.items()}  # once per model, not once per subset
    verdicts: Verdicts = {}
    for subset in subsets:
        validation = {name: float(np.mean([by_seed[s] for s in subset])) for name, by_seed in val_scores.items()}
        reference = choose_reference(validation, baselines)
        test = {name: {s: by_seed[s]["test"].predicted for s in subset} for name, by_seed in predictions.items()}
        verdicts[subset] = {
            name: paired_difference(name, test[name], reference, test[reference], labels["test"], num_classes,
                                    settings.metric, weights, settings.confidence).verdict
            for name in predictions}
    return verdicts


def stability_table(first: Verdicts, second: Verdicts, labels: tuple[str, str]) -> str:
    """Markdown: per subset size, how often every verdict agrees between the runs and what flipped."""
    lines = [f"| seeds | subsets | every verdict agrees ({labels[0]} vs {labels[1]}) | verdicts that agree, "
             "mean | methods whose verdict differs (in how many subsets) |", "|---:|---:|---:|---:|---|"]
    common = [subset for subset in first if subset in second]
    methods = [m for m in first[common[0]] if m in second[common[0]]]  # both runs compare them, in every subset
    for size in sorted({len(subset) for subset in common}):
        subsets = [s for s in common if len(s) == size]
        flipped = Counter(m for s in subsets for m in methods if first[s][m] != second[s][m])
        agreeing = [sum(first[s][m] == second[s][m] for m in methods) for s in subsets]
        named = ", ".join(f"{m} ({n})" for m, n in flipped.most_common()) or "none"
        lines.append(f"| {size} | {len(subsets)} | {agreeing.count(len(methods))} | {np.mean(agreeing):.1f} of "
                     f"{len(methods)} | {named} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="repository directory of the first run")
    parser.add_argument("second", type=Path, help="repository directory of the second run")
    parser.add_argument("--labels", nargs=2, default=("first", "second"), metavar=("FIRST", "SECOND"))
    parser.add_argument("--min-seeds", type=int, default=2, help="the smallest subset size (default 2)")
    args = parser.parse_args(argv)
    runs = [load_run(root.resolve()) for root in (args.first, args.second)]
    seeds = sorted(set(runs[0].seeds) & set(runs[1].seeds))
    if len(seeds) < args.min_seeds:
        raise SystemExit(f"the runs share {len(seeds)} seeds ({seeds}); --min-seeds is {args.min_seeds}")
    subsets = [s for k in range(args.min_seeds, len(seeds) + 1) for s in itertools.combinations(seeds, k)]
    settings = runs[0].settings
    verdicts = [subset_verdicts(run.predictions, run.baselines, subsets, settings) for run in runs]
    sys.stdout.write(f"Seeds both runs have: {seeds}; metric {settings.metric}, {settings.confidence:.0%} "
                     "intervals.\n\n" + stability_table(*verdicts, tuple(args.labels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
