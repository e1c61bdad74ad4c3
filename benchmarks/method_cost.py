"""Each merge method's merge step against one plain fine-tune epoch: wall time and peak memory (no target).

Every entry of configs/methods/all_methods.yaml (``--methods`` picks some) merges the same two sources on
the same target data, each in a fresh process that runs the learn stage (``stages.learn``) as the
stage calls it: settings through ``load_params`` from a params.yaml, the sources loaded and aligned if
asked (``medmerge.merge.inputs.load_sources``), the FT teachers for distill, then ``run_merge_method``
(medmerge's coefficient epochs, interpolate's alpha search, pleas' least squares, zipit's zip, distill's epochs), without MLflow and resume
checkpoints. Not counted: the collapse, BatchNorm recalibration and fine-tune that follow it, and the
process's start-up (imports, params, opening the data, and a warm-up: one tiny training step and
scipy.optimize, which the aligning methods import on first use). The reference is one epoch of the FT
baseline's ``train_classifier`` (params.yaml ``finetune``, validation included) from the anchor source, in a
fresh process too. Memory: on the CPU the peak RSS of the step (VmHWM, reset before it) minus the RSS before
it; on CUDA ``max_memory_allocated`` minus ``memory_allocated`` before it.

Data and sources: params.yaml's target, sources and image size, in a scratch directory. With ``--repo DIR``
(DIR's params.yaml) its prepared target (data/processed/<target>, if prepared at the same image size), its
sources (models/<merge.sources_from>/seed_<n>/<source>, else models/sources/<source> as fetched) and FT
baselines (models/ft/seed_<n>/<source>, distill's teachers) where they exist for the architecture; the rest
is made there: the target by the fetch_data and prepare stages, the models random-initialised (timm).

    python -m benchmarks method_cost                                # the demo setting, every method
    python -m benchmarks method_cost --repo . --device cuda --json out.json
    python -m benchmarks method_cost --arch test_resnet --methods average medmerge \\
        --params data.image_size=32 data.datasets.lesions.options.n_train=24 merge.epochs=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from medmerge import layout, testing
from medmerge.config import Params, parse_params
from medmerge.methods import get_method

from . import REPO
from .peak_memory import peak_bytes, reset_peak, status_kib, trim
from .results import environment
from .stage_times import set_dotted, stage_env

METHODS_FILE = REPO / "configs" / "methods" / "all_methods.yaml"
FINETUNE = "finetune_epoch"  # the reference variant


def warm_up(arch: str, size: int, runtime) -> None:
    """Load what a variant loads on first use, so that it counts against none: the kernels of one tiny training
    step, and scipy.optimize (the aligning methods' matching imports it: 0.4 s and 40 MiB of RSS here)."""
    import scipy.optimize  # noqa: F401

    from medmerge.models import create_model

    model = runtime.prepare(create_model(arch, num_classes=2))
    with runtime.autocast():
        model(torch.rand(2, 3, size, size, device=runtime.device)).sum().backward()


def measure_child(variant: str, seed: int) -> dict:
    """In a fresh process, in the scratch directory: one variant's step, timed, and its peak memory."""
    from medmerge.merge.inputs import load_sources
    from medmerge.methods import MergeInputs, run_merge_method
    from medmerge.models import load_model_dir
    from medmerge.stage import seed_everything, stage_dataset, stage_params, stage_runtime
    from medmerge.train import train_classifier

    params, _ = stage_params()
    runtime = stage_runtime(params)
    settings = params.finetune if variant == FINETUNE else params.method(variant)
    data = stage_dataset(params, params.data.target, settings.batch_size, runtime, seed=seed)
    warm_up(params.arch, params.data.image_size, runtime)
    on_cuda = runtime.device.type == "cuda"
    trim()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resettable = reset_peak()
    before = torch.cuda.memory_allocated() if on_cuda else status_kib("VmRSS") * 1024
    seed_everything(seed)
    start, cpu = time.perf_counter(), time.process_time()
    if variant == FINETUNE:
        state, _ = load_model_dir(layout.source_dir(params.merge.sources_from, params.merge.anchor, seed))
        train_classifier(params.arch, state, data, settings, runtime, epochs=1, seed=seed, description=variant)
    else:
        names = params.source_names
        sources, _, _ = load_sources(params.arch, names, settings.sources_from, seed, settings.anchor,
                                     settings.align, data, runtime)
        teachers = ([load_model_dir(layout.source_dir("ft", name, seed))[0] for name in names]
                    if get_method(settings.method).needs_teachers else None)
        run_merge_method(MergeInputs(params.arch, sources, names, data, settings, runtime, seed, teachers=teachers))
    if on_cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if on_cuda else peak_bytes(resettable)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak - before, "compute": runtime.compute,
            "threads": torch.get_num_threads(), "train_images": len(data.train.labels), "on_cuda": on_cuda,
            "hwm_reset": resettable}


def bench_params(args) -> tuple[dict, Params]:
    """params.yaml (``--repo``'s or this checkout's) with the chosen methods and the options' overrides, and
    its validated form (a bad key stops here, named as the stages name it)."""
    raw = yaml.safe_load(((args.repo or REPO) / "params.yaml").read_text())
    entries = yaml.safe_load(METHODS_FILE.read_text())["methods"]
    unknown = sorted(set(args.methods or ()) - set(entries))
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not entries of {METHODS_FILE}: {sorted(entries)}")
    raw["methods"] = {name: entries[name] for name in args.methods or entries}
    for source in raw["sources"].values():
        source["arch"] = args.arch or source["arch"]
    raw["device"]["type"] = args.device or raw["device"]["type"]
    for assignment in args.params:
        set_dotted(raw, assignment)
    return raw, parse_params(raw)


def model_state(repo: Path | None, directories: list[Path], arch: str, num_classes: int, seed: int
                ) -> tuple[dict, dict, str]:
    """State, card and origin of the first of ``directories`` in ``repo`` (relative to it, as pointer cards are)
    that holds an ``arch`` model; else of a random-initialised one with a ``num_classes`` head (timm, ``seed``)."""
    from medmerge.models import create_model, load_model_dir

    if repo is not None:
        with contextlib.chdir(repo):
            for directory in directories:
                if (directory / "card.json").is_file():
                    state, card = load_model_dir(directory)
                    if card["arch"] == arch:
                        return state, {"arch": arch, "num_classes": card["num_classes"]}, str(repo / directory)
    torch.manual_seed(seed)
    state = create_model(arch, num_classes=num_classes).state_dict()
    return state, {"arch": arch, "num_classes": num_classes}, f"random (seed {seed})"


def set_up(root: Path, repo: Path | None, params: Params, seed: int, env: dict) -> list[str]:
    """The scratch directory ``root``: params.yaml, the prepared target and the models each variant reads;
    returns where the models come from."""
    from medmerge.data import read_meta
    from medmerge.models import save_model_dir

    target = layout.processed_dir(params.data.target)
    given = repo / target if repo is not None else None
    if given and (given / "meta.json").is_file() and read_meta(given)["image_size"] == params.data.image_size:
        (root / target).parent.mkdir(parents=True)
        (root / target).symlink_to(given.resolve())
    else:
        for stage in ("fetch_data", "prepare"):
            testing.run([sys.executable, "-m", f"stages.{stage}", params.data.target], root, env)
    num_classes = read_meta(root / target)["num_classes"]
    models = {layout.source_dir(params.merge.sources_from, name, seed): [layout.SOURCES / name]
              for name in params.source_names}
    if any(get_method(params.method(name).method).needs_teachers for name in params.methods):
        models |= {layout.source_dir("ft", name, seed): [] for name in params.source_names}
    origins = []
    for index, (directory, fallbacks) in enumerate(models.items()):
        state, card, origin = model_state(repo, [directory, *fallbacks], params.arch, num_classes, index)
        save_model_dir(root / directory, state, card)
        origins.append(f"{directory}: {origin}")
    return origins


def run_child(root: Path, env: dict, variant: str, seed: int) -> dict:
    result = testing.run([sys.executable, "-m", "benchmarks.method_cost", "--child", variant, str(seed)], root, env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(medians: dict[str, dict]) -> str:
    base = medians[FINETUNE]
    lines = ["| method | merge time (s) | ÷ one fine-tune epoch | peak memory (MiB) | ÷ fine-tune epoch's peak |",
             "|---|---:|---:|---:|---:|"]
    for name, m in medians.items():
        label = "**one fine-tune epoch** (reference)" if name == FINETUNE else f"`{name}`"
        lines.append(f"| {label} | {m['seconds']:.2f} | {m['seconds'] / base['seconds']:.2f} | "
                     f"{m['peak_bytes'] / 2**20:,.0f} | {m['peak_bytes'] / max(base['peak_bytes'], 1):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one variant in its fresh process (run_child)
        print(json.dumps(measure_child(argv[1], int(argv[2]))))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks method_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="a pipeline checkout: its params, data and models")
    parser.add_argument("--arch", default=None, help="every source's architecture (default: params.yaml's)")
    parser.add_argument("--methods", nargs="+", default=None, help="entries of all_methods.yaml (default: all)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="device.type (default: params.yaml's)")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params.yaml overrides, e.g. merge.epochs=2 methods.distill.options.distill_epochs=1")
    parser.add_argument("--seed", type=int, default=None, help="the seed (default: params.yaml's first)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per variant, alternating; medians")
    parser.add_argument("--json", type=Path, default=None, help="also save everything measured here")
    args = parser.parse_args(argv)
    raw, params = bench_params(args)
    seed = params.seeds[0] if args.seed is None else args.seed
    env = stage_env()  # the children import this checkout's packages from the scratch directory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env_info = environment(None)  # the CPU model from /proc/cpuinfo
    variants = [FINETUNE, *params.methods]
    samples: dict[str, list[dict]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="medmerge-method-cost-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        origins = set_up(root, args.repo, params, seed, env)
        for _ in range(args.repeats):
            for variant in variants:
                samples[variant].append(run_child(root, env, variant, seed))
                print(f"method_cost {variant}: {samples[variant][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    medians = {v: {k: statistics.median(s[k] for s in samples[v]) for k in ("seconds", "cpu_seconds", "peak_bytes")}
               for v in variants}
    first = samples[FINETUNE][0]
    memory = "CUDA max_memory_allocated" if first["on_cuda"] else "peak RSS increase of a fresh process"
    print(f"\n{env_info['date']}: {env_info['device']}; {first['compute']}, {first['threads']} torch threads, "
          f"torch {env_info['torch']}; {params.arch}, {params.data.image_size} px, {first['train_images']} target "
          f"training images ({params.data.target}), seed {seed}, median of {args.repeats}; memory: {memory}; "
          f"load average {env_info['load_average_1min']:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n"
          f"models: {'; '.join(origins)}\n")
    print(table(medians))
    if args.json is not None:
        report = {"environment": env_info, "args": {k: str(v) for k, v in vars(args).items()}, "params": raw,
                  "models": origins, "samples": samples, "medians": medians}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nsaved {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
