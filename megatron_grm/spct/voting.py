"""Inference-time scaling by voting (paper §4.1) and MetaRM-guided voting (paper §4.2).

Voting@k: sample k judgments, each with the responses shown in a fresh random order, map each judgment's
scores back to the original order, and sum per response (the paper's S*_i = sum_j S_ij). The predicted
best response is the argmax of the sums; ties are broken by a seeded random choice. Unparseable
judgments contribute nothing. MetaRM@k keeps only the k_meta judgments the MetaRM rates highest (default
k/2, at least 1) and votes over those.

Permutation convention: ``perm[k]`` is the original index of the response shown at position ``k``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

ScoreList = Sequence[int] | None


def sample_permutation(n: int, rng: random.Random) -> list[int]:
    """A uniformly random order in which to show n responses (one per sampled judgment, paper §4.1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    perm = list(range(n))
    rng.shuffle(perm)
    return perm


def permute_responses(responses: Sequence[str], perm: Sequence[int]) -> list[str]:
    """The responses in shown order: position k shows ``responses[perm[k]]``."""
    _check_perm(perm, len(responses))
    return [responses[i] for i in perm]


def unpermute_scores(scores_in_shown_order: Sequence[int] | None, perm: Sequence[int]) -> list[int] | None:
    """Map the scores of a judgment made on shown order back to the original response order."""
    if scores_in_shown_order is None:
        return None
    _check_perm(perm, len(scores_in_shown_order))
    scores = [0] * len(perm)
    for shown, original in enumerate(perm):
        scores[original] = scores_in_shown_order[shown]
    return scores


def _check_perm(perm: Sequence[int], n: int) -> None:
    if sorted(perm) != list(range(n)):
        raise ValueError(f"perm must be a permutation of 0..{n - 1}, got {list(perm)}")


def voted_scores(score_lists: Sequence[ScoreList], num_responses: int) -> list[int]:
    """Summed scores per response over the parseable judgments (paper §4.1, S*_i = sum_j S_ij).

    ``num_responses`` is required so that k unparseable judgments are an all-zero (tied) vote, not an error.
    For n = 1 this is the voted reward of the single response (used for ROC-AUC).
    """
    valid = [list(s) for s in score_lists if s is not None]
    n = num_responses
    totals = [0] * n
    for scores in valid:
        if len(scores) != n:
            raise ValueError(f"every judgment must score {n} responses, got {len(scores)}")
        for i, s in enumerate(scores):
            totals[i] += s
    return totals


def argmax_random_tie(values: Sequence[float], rng: random.Random) -> int:
    """Index of the maximum; among tied maxima a seeded random choice (ties must not favour position)."""
    if len(values) == 0:
        raise ValueError("values must not be empty")
    top = max(values)
    return rng.choice([i for i, v in enumerate(values) if v == top])


def vote(score_lists: Sequence[ScoreList], rng: random.Random, num_responses: int) -> int:
    """Voting@k: the index of the response with the highest summed score, ties broken at random."""
    return argmax_random_tie(voted_scores(score_lists, num_responses), rng)


def default_k_meta(k: int) -> int:
    """The paper's default number of judgments MetaRM keeps: half of k, at least one."""
    return max(1, k // 2)


def meta_filter(
    score_lists: Sequence[ScoreList], meta_scores: Sequence[float], k_meta: int | None = None
) -> list[ScoreList]:
    """The k_meta judgments with the highest meta scores (paper §4.2).

    Equal meta scores keep the earlier-sampled judgment (a stable sort), so the result is deterministic.
    Unparseable judgments are ranked like any other; if kept, they add nothing to the vote. A NaN meta score
    (e.g. a low-precision overflow) ranks last: NaN compares false with everything and would scramble the sort.
    """
    k = len(score_lists)
    if len(meta_scores) != k:
        raise ValueError(f"{k} judgments but {len(meta_scores)} meta scores")
    if k == 0:
        raise ValueError("no judgments to filter")
    keep = default_k_meta(k) if k_meta is None else k_meta
    if not 1 <= keep <= k:
        raise ValueError(f"k_meta must be in [1, {k}], got {keep}")
    order = sorted(range(k), key=lambda j: (math.isnan(meta_scores[j]), -meta_scores[j]))
    return [score_lists[j] for j in order[:keep]]


def meta_guided_vote(
    score_lists: Sequence[ScoreList],
    meta_scores: Sequence[float],
    k_meta: int | None,
    rng: random.Random,
    num_responses: int,
) -> int:
    """MetaRM@k: vote over the k_meta judgments the MetaRM rates highest (default k/2, at least 1)."""
    return vote(meta_filter(score_lists, meta_scores, k_meta), rng, num_responses)


def single_response_vote(score_lists: Sequence[ScoreList], rng: random.Random) -> int:
    """Voting for a single response (0/1 scores): the majority of the parseable verdicts, ties at random."""
    total = voted_scores(score_lists, 1)[0]
    valid = sum(s is not None for s in score_lists)
    if 2 * total == valid:
        return rng.randrange(2)
    return int(2 * total > valid)
