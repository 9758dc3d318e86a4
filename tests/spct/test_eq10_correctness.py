"""Eq. 10 and the GRPO rule reward against hand-computed cases."""

import pytest

from megatron_grm.spct import is_correct, rule_reward


@pytest.mark.parametrize(
    ("scores", "best", "expected"),
    [
        ([8, 3], 0, True),
        ([3, 8], 0, False),
        ([8, 8], 0, False),  # a tie is not "strictly above"
        ([8, 8], 1, False),
        ([9, 8, 2], 0, True),
        ([9, 9, 2], 0, False),  # tied with one loser is enough to fail
        ([2, 9, 8], 1, True),
        ([1, 1, 1, 1], 3, False),
        ([1, 2, 3, 4, 10], 4, True),
    ],
)
def test_multi_response_best_must_be_strictly_above_every_other(scores, best, expected):
    assert is_correct(scores, best_index=best) is expected


@pytest.mark.parametrize(
    ("scores", "label", "expected"), [([1], 1, True), ([0], 0, True), ([0], 1, False), ([1], 0, False)]
)
def test_single_response_score_must_equal_label(scores, label, expected):
    assert is_correct(scores, label=label) is expected


def test_unparseable_judgment_is_incorrect():
    assert is_correct(None, best_index=0) is False
    assert is_correct(None, label=1) is False


def test_label_serves_as_best_index_for_multi_response():
    assert is_correct([2, 9], label=1) is True
    assert is_correct([2, 9], label=0) is False


def test_best_index_takes_precedence_over_label():
    assert is_correct([2, 9], best_index=1, label=0) is True


@pytest.mark.parametrize(
    ("scores", "kwargs"),
    [([8, 3], {}), ([8, 3], {"best_index": 2}), ([8, 3], {"best_index": -1}), ([1], {}), ([], {"label": 0})],
)
def test_missing_or_invalid_label_is_a_usage_error(scores, kwargs):
    with pytest.raises(ValueError):
        is_correct(scores, **kwargs)


def test_rule_reward_is_plus_one_or_minus_one():
    assert rule_reward([8, 3], best_index=0) == 1.0
    assert rule_reward([8, 8], best_index=0) == -1.0
    assert rule_reward(None, best_index=0) == -1.0
    assert rule_reward([0], label=0) == 1.0
    assert rule_reward([1], label=0) == -1.0
