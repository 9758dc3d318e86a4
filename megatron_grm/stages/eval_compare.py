"""Two evaluation runs compared example by example: is B's accuracy above A's by more than the noise?

Every evaluation writes ``outcomes.jsonl``: for each benchmark, method (table row) and example, whether the
verdict was right. Two runs of the evaluation stage on the same benchmarks with the same ``trainer.seed``
show each example's responses in the same orders and draw their samples from the same per-request random
streams (``docs/rollout.md``, "Seeds"), so the comparison is paired twice: by example, and by the random
numbers each example's judgments used. The difference of accuracies is the mean per-example difference;
its standard error (:func:`~megatron_grm.spct.paired_difference`) and McNemar's exact test count only the
examples one model got right and the other wrong, which is what two unpaired accuracies' error bars
would hide.

    python tools/compare_evals.py runs/eval_rft runs/eval_grpo
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_grm.data.readers.common import json_object_lines, require_types
from megatron_grm.spct import mcnemar_p, paired_difference

OUTCOMES_FILE = "outcomes.jsonl"  # written by stages/evaluate.py

Outcomes = dict[tuple[str, str], dict[str, bool]]  # (method, benchmark) -> example id -> correct


@dataclass(frozen=True)
class Comparison:
    """One (method, benchmark) cell of two runs; ``difference`` is B's accuracy minus A's."""

    method: str
    benchmark: str
    examples: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    standard_error: float
    only_a: int  # examples A judged right and B wrong
    only_b: int
    p_value: float  # McNemar, exact, two-sided


def read_outcomes(run_dir: str | os.PathLike) -> Outcomes:
    """A run's ``outcomes.jsonl``; a malformed record is an error naming the file, line and field."""
    path = Path(run_dir) / OUTCOMES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (megatron_grm.stages.evaluate writes it; re-running an older "
                                "evaluation with its run folder reuses its samples.jsonl and writes it)")
    outcomes: Outcomes = {}
    for where, record in json_object_lines(path):
        require_types(record, where, {"benchmark": str, "method": str, "example_id": str, "correct": bool})
        cell = outcomes.setdefault((record["method"], record["benchmark"]), {})
        if record["example_id"] in cell:
            raise ValueError(f"{where}: example {record['example_id']!r} appears twice for method "
                             f"{record['method']!r} on {record['benchmark']!r}")
        cell[record["example_id"]] = record["correct"]
    return outcomes


def compare_outcomes(a: Outcomes, b: Outcomes) -> list[Comparison]:
    """Every (method, benchmark) both runs have, in A's order. Both must hold the same examples: a
    comparison over different example sets would not be paired."""
    comparisons = []
    for key in (k for k in a if k in b):
        left, right = a[key], b[key]
        if set(left) != set(right):
            missing, extra = sorted(set(left) - set(right)), sorted(set(right) - set(left))
            raise ValueError(f"{key[0]} on {key[1]}: the runs judged different examples ({len(missing)} only in A, "
                             f"e.g. {missing[:3]}; {len(extra)} only in B, e.g. {extra[:3]})")
        ids = list(left)
        x, y = [float(left[i]) for i in ids], [float(right[i]) for i in ids]
        if len(ids) >= 2:
            difference, se = paired_difference(x, y)
        else:
            difference, se = y[0] - x[0], float("nan")
        only_a = sum(left[i] and not right[i] for i in ids)
        only_b = sum(right[i] and not left[i] for i in ids)
        comparisons.append(Comparison(key[0], key[1], len(ids), sum(x) / len(x), sum(y) / len(y), difference, se,
                                      only_a, only_b, mcnemar_p(only_a, only_b)))
    if not comparisons:
        raise ValueError(f"the runs share no (method, benchmark): A has {sorted(a)}, B has {sorted(b)}")
    return comparisons


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> list[Comparison]:
    return compare_outcomes(read_outcomes(run_a), read_outcomes(run_b))


def comparison_markdown(comparisons: list[Comparison], name_a: str = "A", name_b: str = "B") -> str:
    """One row per (method, benchmark): both accuracies (%), B − A ± its paired standard error (points),
    the discordant examples and McNemar's p."""
    lines = [f"| method | benchmark | examples | {name_a} | {name_b} | {name_b} − {name_a} (± SE) | "
             f"right only by {name_a} / {name_b} | McNemar p |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.method} | {c.benchmark} | {c.examples} | {100 * c.accuracy_a:.1f} | "
                     f"{100 * c.accuracy_b:.1f} | {100 * c.difference:+.1f} ± {100 * c.standard_error:.1f} | "
                     f"{c.only_a} / {c.only_b} | {c.p_value:.3g} |")
    return "\n".join(lines) + "\n"
