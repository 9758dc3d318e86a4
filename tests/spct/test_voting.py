"""Voting@k and MetaRM@k against hand-computed cases, and shuffling that does not leak position."""

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_grm.spct import (
    default_k_meta,
    meta_filter,
    meta_guided_vote,
    parse_judgment,
    permute_responses,
    render_judgment,
    sample_permutation,
    unpermute_scores,
    vote,
    voted_scores,
)


def test_sample_permutation_is_a_seeded_permutation():
    perm = sample_permutation(6, random.Random(3))
    assert sorted(perm) == list(range(6))
    assert perm == sample_permutation(6, random.Random(3))
    orders = {tuple(sample_permutation(3, random.Random(s))) for s in range(200)}
    assert len(orders) == 6  # every order of 3 responses occurs


def test_unpermute_scores_hand_case():
    # Shown order: position 0 shows response 2, position 1 shows response 0, position 2 shows response 1.
    perm = [2, 0, 1]
    assert permute_responses(["a", "b", "c"], perm) == ["c", "a", "b"]
    assert unpermute_scores([9, 5, 1], perm) == [5, 1, 9]
    assert unpermute_scores(None, perm) is None


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=10**6))
def test_unpermute_inverts_permute(n, seed):
    perm = sample_permutation(n, random.Random(seed))
    original = [10 * i for i in range(n)]
    shown = permute_responses([str(s) for s in original], perm)
    assert unpermute_scores([int(s) for s in shown], perm) == original


def test_unpermute_rejects_a_non_permutation():
    with pytest.raises(ValueError):
        unpermute_scores([1, 2], [0, 0])


def test_vote_sums_scores_per_response():
    judgments = [[8, 3, 5], [4, 6, 5], [2, 9, 1]]
    assert voted_scores(judgments, 3) == [14, 18, 11]
    assert vote(judgments, random.Random(0), 3) == 1


def test_vote_ignores_unparseable_judgments():
    assert voted_scores([None, [3, 8], None, [6, 4]], 2) == [9, 12]
    assert vote([None, [3, 8], None, [6, 4]], random.Random(0), 2) == 1


def test_vote_single_response_sums_its_verdicts():
    assert voted_scores([[1], [0], [1], None], 1) == [2]
    assert vote([[1], [0]], random.Random(0), 1) == 0


def test_vote_ties_are_broken_by_a_seeded_random_choice():
    tied = [[7, 3, 7], [5, 9, 5]]
    assert voted_scores(tied, 3) == [12, 12, 12]
    picks = Counter(vote(tied, random.Random(seed), 3) for seed in range(300))
    assert set(picks) == {0, 1, 2}
    assert min(picks.values()) > 60  # roughly uniform, not always the first position
    assert vote(tied, random.Random(42), 3) == vote(tied, random.Random(42), 3)


def test_vote_tie_only_among_the_maxima():
    picks = {vote([[9, 2, 9]], random.Random(seed), 3) for seed in range(100)}
    assert picks == {0, 2}


def test_vote_over_zero_parseable_judgments_is_a_random_tie_not_an_error():
    assert voted_scores([None, None], 2) == [0, 0]
    picks = {vote([None, None], random.Random(seed), num_responses=2) for seed in range(50)}
    assert picks == {0, 1}


def test_vote_rejects_judgments_of_different_sizes():
    with pytest.raises(ValueError):
        voted_scores([[1, 2], [1, 2, 3]], 2)


@pytest.mark.parametrize(("k", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (8, 4), (32, 16)])
def test_default_k_meta_is_half_of_k_at_least_one(k, expected):
    assert default_k_meta(k) == expected


# Four judgments; the MetaRM trusts judgment 0 most, then 3, then 2, then 1.
JUDGMENTS = [[6, 5], [1, 9], [2, 8], [7, 6]]
META = [0.9, 0.1, 0.2, 0.8]


@pytest.mark.parametrize(
    ("k_meta", "kept", "winner"),  # kept judgments are listed most trusted first
    [
        (1, [[6, 5]], 0),  # k_meta = 1: only the most trusted judgment votes
        (None, [[6, 5], [7, 6]], 0),  # default k/2 = 2: sums [13, 11]
        (3, [[6, 5], [7, 6], [2, 8]], 1),  # sums [15, 19]
        (4, [[6, 5], [7, 6], [2, 8], [1, 9]], 1),  # k_meta = k: all vote, sums [16, 28]
    ],
)
def test_meta_guided_vote_hand_cases(k_meta, kept, winner):
    assert meta_filter(JUDGMENTS, META, k_meta) == kept
    assert meta_guided_vote(JUDGMENTS, META, k_meta, random.Random(0), 2) == winner


def test_meta_guided_vote_with_k_meta_equal_k_is_plain_voting():
    rng_a, rng_b = random.Random(5), random.Random(5)
    judgments = [[3, 3], [5, 5], [2, 2]]  # every vote ties: both paths must draw the same tie-break
    assert meta_guided_vote(judgments, [0.3, 0.1, 0.2], 3, rng_a, 2) == vote(judgments, rng_b, 2)


def test_meta_filter_equal_meta_scores_keep_the_earlier_judgment():
    assert meta_filter([[1, 9], [9, 1], [5, 5]], [0.5, 0.5, 0.5], 1) == [[1, 9]]


@pytest.mark.parametrize("nan_at", [0, 1, 2, 3])
def test_meta_filter_ranks_a_nan_meta_score_last(nan_at):
    meta = [0.9, 0.1, 0.5, 0.95]
    meta[nan_at] = float("nan")
    kept = meta_filter(JUDGMENTS, meta, 2)
    finite = sorted((j for j in range(4) if j != nan_at), key=lambda j: -meta[j])[:2]
    assert kept == [JUDGMENTS[j] for j in finite]
    assert meta_filter(JUDGMENTS, meta, 4)[-1] == JUDGMENTS[nan_at]


def test_meta_filter_keeps_unparseable_judgments_by_rank_and_they_add_nothing():
    kept = meta_filter([None, [2, 8], [9, 1]], [0.9, 0.8, 0.1], 2)
    assert kept == [None, [2, 8]]
    assert meta_guided_vote([None, [2, 8], [9, 1]], [0.9, 0.8, 0.1], 2, random.Random(0), 2) == 1


@pytest.mark.parametrize("k_meta", [0, 5])
def test_meta_filter_rejects_k_meta_outside_1_to_k(k_meta):
    with pytest.raises(ValueError):
        meta_filter(JUDGMENTS, META, k_meta)


def test_meta_filter_needs_one_meta_score_per_judgment():
    with pytest.raises(ValueError):
        meta_filter(JUDGMENTS, META[:3], 2)


def longest_text_judge(shown_responses):
    """A judge that only looks at text: the longest shown response gets 9, every other one 2."""
    longest = max(range(len(shown_responses)), key=lambda i: len(shown_responses[i]))
    scores = [9 if i == longest else 2 for i in range(len(shown_responses))]
    return render_judgment("Length (100%).", "The longest response is the most complete.", scores)


def voting_at_k(responses, k, rng, unshuffle=True):
    score_lists = []
    for _ in range(k):
        perm = sample_permutation(len(responses), rng)
        judgment = parse_judgment(longest_text_judge(permute_responses(responses, perm)), len(responses))
        score_lists.append(unpermute_scores(judgment.scores, perm) if unshuffle else judgment.scores)
    return score_lists


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_shuffled_voting_maps_every_score_back_to_its_response(n):
    rng = random.Random(n)
    for trial in range(40):
        lengths = rng.sample(range(1, 60), n)
        responses = ["x" * length for length in lengths]
        longest = lengths.index(max(lengths))
        score_lists = voting_at_k(responses, k=8, rng=rng)
        for scores in score_lists:
            assert scores == [9 if i == longest else 2 for i in range(n)]
        assert vote(score_lists, rng, len(responses)) == longest, f"trial {trial}"


def test_without_unpermuting_the_shown_position_leaks_into_the_vote():
    # Control for the test above: summing shown-order scores credits whatever sat in the longest
    # response's shown position, so the vote is often wrong. The round trip is what makes it right.
    rng = random.Random(0)
    wrong = 0
    for _ in range(40):
        responses = ["x" * length for length in rng.sample(range(1, 60), 4)]
        longest = max(range(4), key=lambda i: len(responses[i]))
        wrong += vote(voting_at_k(responses, k=8, rng=rng, unshuffle=False), rng, len(responses)) != longest
    assert wrong >= 10


def test_single_response_vote_is_the_majority_of_parseable_verdicts():
    from megatron_grm.spct import single_response_vote

    rng = random.Random(0)
    assert single_response_vote([[1], [0], [1], None], rng) == 1  # 2 of 3 parseable say correct
    assert single_response_vote([[0], [0], [1], None, None], rng) == 0
    # A tie (or nothing parseable) is a coin flip: both outcomes occur over many draws.
    assert {single_response_vote([[1], [0]], rng) for _ in range(50)} == {0, 1}
    assert {single_response_vote([None, None], rng) for _ in range(50)} == {0, 1}
