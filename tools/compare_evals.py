"""Compare two evaluation runs example by example: B − A per method and benchmark, ± its paired standard
error, the examples only one of them got right, and McNemar's exact p.

    python tools/compare_evals.py runs/eval_rft runs/eval_grpo --names RFT GRPO
    python tools/compare_evals.py A B --json        # the same as JSON records

Both runs must be evaluations (``megatron_grm.stages.evaluate``) of the same benchmarks; with the same
``trainer.seed`` their draws are paired as well (docs/evaluation.md, "Comparing two runs").
Exit status: 0, or 2 when the runs cannot be compared (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grm.stages.eval_compare import compare_runs, comparison_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="evaluation run folder (holds outcomes.jsonl)")
    parser.add_argument("run_b", help="evaluation run folder compared against run_a (B − A)")
    parser.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"))
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a markdown table")
    args = parser.parse_args(argv)
    try:
        comparisons = compare_runs(args.run_a, args.run_b)
    except (FileNotFoundError, ValueError) as err:
        print(f"compare_evals: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(c) for c in comparisons], indent=2))
    else:
        print(comparison_markdown(comparisons, *args.names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
