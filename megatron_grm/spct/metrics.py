"""Benchmark metrics and the results table (paper §5.1, Tables 2-4).

- pairwise accuracy: the chosen response scores strictly higher than the rejected one (ties are wrong,
  as in Eq. 10);
- best-of-N accuracy (RMB): the best response scores strictly higher than every loser;
- ROC-AUC for single-response sets (0/1 labels), computed here as the Mann-Whitney statistic with ties
  counted one half;
- per-category breakdowns over '/'-separated category paths, and macro averages over categories;
- the paired difference of two models' per-example values on the same examples, with its standard error,
  and McNemar's exact test for paired right/wrong verdicts.
Accuracies are fractions in [0, 1]; the markdown table shows them in percent like the paper.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_grm.spct.correctness import is_correct


def _mean(values: Sequence[float]) -> float:
    if len(values) == 0:
        raise ValueError("cannot average an empty set")
    return sum(values) / len(values)


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction of examples judged correctly."""
    return _mean([1.0 if c else 0.0 for c in correct])


def pairwise_accuracy(
    chosen_scores: Sequence[float | None], rejected_scores: Sequence[float | None]
) -> float:
    """Fraction of pairs whose chosen response scores strictly higher; a missing score is wrong."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"{len(chosen_scores)} chosen scores but {len(rejected_scores)} rejected scores")
    return accuracy(
        [c is not None and r is not None and c > r for c, r in zip(chosen_scores, rejected_scores)]
    )


def best_of_n_accuracy(score_lists: Sequence[Sequence[float] | None], best_indices: Sequence[int]) -> float:
    """RMB best-of-N accuracy: the labelled best must beat every loser strictly (Eq. 10 per example)."""
    if len(score_lists) != len(best_indices):
        raise ValueError(f"{len(score_lists)} score lists but {len(best_indices)} labels")
    return accuracy([is_correct(s, best_index=b) for s, b in zip(score_lists, best_indices)])


def prediction_accuracy(predicted: Sequence[int], best_indices: Sequence[int]) -> float:
    """Fraction of examples whose predicted best response (e.g. from voting) is the labelled best."""
    if len(predicted) != len(best_indices):
        raise ValueError(f"{len(predicted)} predictions but {len(best_indices)} labels")
    return accuracy([p == b for p, b in zip(predicted, best_indices)])


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve for 0/1 labels: P(score of a positive > score of a negative), ties 1/2.

    Computed from average ranks (Mann-Whitney U), O(n log n).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if any(lab not in (0, 1) for lab in labels):
        raise ValueError("labels must be 0 or 1")
    if any(not math.isfinite(s) for s in scores):
        raise ValueError("scores must be finite")
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative example")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1  # 1-based rank shared by the tied block
        for k in range(start, end + 1):
            ranks[order[k]] = average_rank
        start = end + 1
    positive_rank_sum = sum(r for r, lab in zip(ranks, labels) if lab == 1)
    u = positive_rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def category_prefix(category: str, depth: int | None) -> str:
    """The first ``depth`` components of a '/'-separated category path (all of it for None)."""
    if depth is None:
        return category
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return "/".join(category.split("/")[:depth])


def per_category(
    values: Sequence[float | bool], categories: Sequence[str], depth: int | None = None
) -> dict[str, float]:
    """Mean of per-example values (e.g. correct/incorrect) within each category, sorted by category."""
    if len(values) != len(categories):
        raise ValueError(f"{len(values)} values but {len(categories)} categories")
    groups: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(values, categories):
        groups[category_prefix(c, depth)].append(float(v))
    return {c: _mean(vs) for c, vs in sorted(groups.items())}


def macro_average(by_category: Mapping[str, float]) -> float:
    """Unweighted mean over categories, so small categories count as much as large ones."""
    return _mean(list(by_category.values()))


def paired_difference(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of ``after[i] - before[i]`` and its standard error (sample standard deviation / sqrt(n)).

    Pairing by example removes the between-example variance from the comparison; when both sides also
    drew the same random numbers (the rollout's per-request streams), most of the sampling noise cancels
    as well, so a small change in a model stands out of far fewer samples than two unpaired means need.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} values before but {len(after)} after")
    if len(before) < 2:
        raise ValueError("paired_difference: needs at least 2 pairs for a standard error")
    diffs = [b - a for a, b in zip(before, after)]
    mean = _mean(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test for paired right/wrong verdicts: the probability, if both models were
    equally good, of a split of the discordant examples (right by one model only) at least this uneven.

    Under that hypothesis each of the ``only_a + only_b`` discordant examples falls to either side with
    probability 1/2; the p-value is twice the smaller binomial tail, at most 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_p: counts must be >= 0, got {only_a} and {only_b}")
    n, low = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


Results = Mapping[str, Mapping[str, float]]


def results_markdown(
    results: Results, benchmarks: Sequence[str] | None = None, overall: bool = True, digits: int = 1
) -> str:
    """A markdown table like the paper's: rows = methods, columns = benchmarks (+ Overall), in percent.

    A method without a result for a benchmark shows '-' and gets no Overall (it would not be comparable).
    """
    if benchmarks is None:
        benchmarks = sorted({b for per_method in results.values() for b in per_method})
    header = ["Method", *benchmarks] + (["Overall"] if overall else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for method, per_method in results.items():
        cells = [f"{100 * per_method[b]:.{digits}f}" if b in per_method else "-" for b in benchmarks]
        if overall:
            complete = all(b in per_method for b in benchmarks) and len(benchmarks) > 0
            cells.append(
                f"{100 * _mean([per_method[b] for b in benchmarks]):.{digits}f}" if complete else "-"
            )
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Results, json_path: str | Path, markdown_path: str | Path | None = None) -> None:
    """Write results as JSON (fractions, for machines) and optionally as the markdown table (for people)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({m: dict(r) for m, r in results.items()}, indent=2, sort_keys=True) + "\n"
    )
    if markdown_path is not None:
        markdown_path = Path(markdown_path)
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(results_markdown(results))
