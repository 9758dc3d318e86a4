"""When a judgment is correct (paper Eq. 10), and the rule reward built on it for GRPO (paper §3.2).

Eq. 10: for n >= 2 the judgment is correct iff the labelled best response scores strictly higher than
every other response; for n = 1 iff its score equals the 0/1 label. An unparseable judgment (``None``
scores) is incorrect. The same predicate labels rejective sampling (RFT), gives the GRPO reward, and
gives the MetaRM its binary targets.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_correct(scores: Sequence[int] | None, best_index: int | None = None, label: int | None = None) -> bool:
    """Paper Eq. 10.

    n >= 2: ``scores[best] > scores[j]`` for every ``j != best``; ``best`` is ``best_index`` or, if that
    is None, ``label`` (an example's label is its best index when n >= 2). n = 1: ``scores[0] == label``.
    """
    if scores is None:
        return False
    n = len(scores)
    if n == 0:
        raise ValueError("scores must not be empty")
    if n == 1:
        if label is None:
            raise ValueError("a single-response judgment needs the 0/1 label")
        return scores[0] == label
    best = best_index if best_index is not None else label
    if best is None:
        raise ValueError("a multi-response judgment needs best_index (or label)")
    if not 0 <= best < n:
        raise ValueError(f"best index {best} out of range for {n} scores")
    return all(scores[best] > s for j, s in enumerate(scores) if j != best)


def rule_reward(
    scores: Sequence[int] | None, best_index: int | None = None, label: int | None = None
) -> float:
    """The GRPO rule reward (paper §3.2): +1 for a correct judgment (Eq. 10), -1 otherwise."""
    return 1.0 if is_correct(scores, best_index=best_index, label=label) else -1.0
