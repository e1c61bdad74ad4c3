"""Run one benchmark: ``python -m benchmarks MEASUREMENT [OPTIONS]``, from the repository root;
``python -m benchmarks MEASUREMENT --help`` lists its options."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

MEASUREMENTS = ("suite", "step_time", "loader_throughput", "peak_memory", "stage_times", "step_profile",
                "data_stream", "alignment_time", "repair_layernorm", "method_cost", "depthwise_grad")


def summary(name: str) -> str:
    """The first line of a measurement's docstring, read without importing it (importing torch takes seconds)."""
    source = (Path(__file__).parent / f"{name}.py").read_text()
    return ast.get_docstring(ast.parse(source)).splitlines()[0]


def main(argv: list[str] | None = None) -> None:
    listing = "\n".join(f"  {name:<18} {summary(name)}" for name in MEASUREMENTS)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     epilog=f"measurements:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurement", choices=MEASUREMENTS, metavar="MEASUREMENT", help="one of those below")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="its options")
    args = parser.parse_args(argv)
    importlib.import_module(f"{__package__}.{args.measurement}").main(args.options)


if __name__ == "__main__":
    main()
