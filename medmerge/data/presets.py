"""Dataset presets: ``configs/<name>.yaml`` holds a ready ``data.datasets.<name>`` entry that reads a public
dataset in its official layout; :func:`apply_preset` merges it into a params mapping.

A preset file has ``name`` (the dataset key), ``dataset`` (a :class:`medmerge.config.DatasetSettings`
entry in which ``${root}`` stands for the folder holding the dataset) and optionally ``data`` (settings of
the ``data`` section it is meant for, e.g. ``image_size: 224``). From the command line::

    python -m medmerge.data.presets apply configs/aptos.yaml --root /data/aptos            # into params.yaml
    python -m medmerge.data.presets apply configs/aptos.yaml --root /data/aptos --target   # ... as the target
    python -m medmerge.data.presets show configs/aptos.yaml --root /data/aptos             # print the entry

``apply`` validates the result (the same checks as every stage) before it rewrites the params file
atomically; the file is written by PyYAML, so its comments are not kept.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from medmerge.config import PARAMS_FILE, parse_params
from medmerge.io import atomic_file

ROOT_MARK = "${root}"


def _substitute(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(ROOT_MARK, root)
    if isinstance(value, list):
        return [_substitute(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, root) for k, v in value.items()}
    return value


def load_preset(path: str | Path, root: str | Path) -> dict[str, Any]:
    """The preset at ``path`` with ``${root}`` replaced by ``root``: ``{"name", "dataset", "data"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preset file not found")
    preset = yaml.safe_load(path.read_text()) or {}
    missing = [key for key in ("name", "dataset") if key not in preset]
    if missing:
        raise ValueError(f"{path}: preset lacks key(s) {missing}; expected name, dataset and optionally data")
    return {
        "name": str(preset["name"]),
        "dataset": _substitute(preset["dataset"], Path(root).as_posix()),
        "data": dict(preset.get("data") or {}),
    }


def apply_preset(
    params: dict[str, Any], preset: dict[str, Any], target: bool = False, name: str | None = None
) -> dict[str, Any]:
    """A copy of ``params`` with the preset's dataset under ``data.datasets.<name>`` and its ``data`` settings
    (``target``: the dataset also becomes ``data.target``)."""
    out = copy.deepcopy(params)
    data = out.setdefault("data", {})
    key = name or preset["name"]
    data.setdefault("datasets", {})[key] = copy.deepcopy(preset["dataset"])
    data.update(copy.deepcopy(preset["data"]))
    if target:
        data["target"] = key
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmerge.data.presets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("apply", "show"):
        sub = commands.add_parser(command)
        sub.add_argument("preset", help="configs/<name>.yaml")
        sub.add_argument("--root", required=True, help="the folder holding the dataset's official layout")
        sub.add_argument("--name", help="dataset key (default: the preset's name)")
        sub.add_argument("--target", action="store_true", help="make it data.target")
        sub.add_argument("--params", default=PARAMS_FILE, help="params file to update (default: params.yaml)")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset, args.root)
    if args.command == "show":
        print(yaml.safe_dump({"data": {**preset["data"], "datasets": {args.name or preset["name"]: preset["dataset"]}}},
                             sort_keys=False), end="")
        return 0
    params_path = Path(args.params)
    params = apply_preset(yaml.safe_load(params_path.read_text()) or {}, preset, args.target, args.name)
    parse_params(params, params_path)  # refuse to write params that no stage would accept
    with atomic_file(params_path) as tmp:
        tmp.write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"{params_path}: data.datasets.{args.name or preset['name']} from {args.preset}"
          + (" (the target)" if args.target else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
