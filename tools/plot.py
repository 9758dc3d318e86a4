"""Accuracy against k for several evaluation runs on one figure (paper Figure 1's axes): Voting@k and
MetaRM@k per run, Greedy (and the LLM-as-a-judge baseline) as horizontal lines.

    python tools/plot.py runs/demo/eval_rft runs/demo/eval_grpo --names RFT GRPO --out scaling.png
    python tools/plot.py A B C --benchmark rmb_pairwise --out rmb.png   # one benchmark instead of overall

Each run is an evaluation folder (``megatron_grm.stages.evaluate`` writes its ``results.json``). The
plotted values are printed as a table, in percent. Exit status: 0, or 2 when a run cannot be read (the
reason, with the file and field, is printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grm.stages.plots import plot_runs, read_scaling


def values_table(drawn: dict[str, tuple[list[int], list[float]]]) -> str:
    """The plotted lines as a markdown table: one row per line, one column per k."""
    ks = sorted({k for xs, _ in drawn.values() for k in xs})
    lines = ["| line | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label, (xs, ys) in drawn.items():
        at = dict(zip(xs, ys))
        lines.append(f"| {label} | " + " | ".join(f"{at[k]:.1f}" if k in at else "" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="evaluation run folders (each holds results.json)")
    parser.add_argument("--names", nargs="+", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--benchmark", default=None, help="plot this benchmark's accuracy (default: overall)")
    parser.add_argument("--out", default="scaling.png", help="the PNG to write (default: scaling.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    names = args.names or [Path(run).resolve().name for run in args.runs]
    if len(names) != len(args.runs):
        print(f"plot: {len(names)} --names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    if len(set(names)) != len(names):
        print(f"plot: run names must differ, got {names} (give --names)", file=sys.stderr)
        return 2
    try:
        runs = {name: read_scaling(run, args.benchmark) for name, run in zip(names, args.runs)}
    except (FileNotFoundError, ValueError) as err:
        print(f"plot: {err}", file=sys.stderr)
        return 2
    what = args.benchmark or "overall"
    title = args.title or f"Inference-time scaling ({what}): {', '.join(names)}"
    drawn = plot_runs(runs, args.out, title, ylabel=f"{what} accuracy (%)")
    print(values_table(drawn), end="")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
