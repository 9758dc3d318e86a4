"""The example schema: validation and reordering responses without losing the label."""

import random

import pytest

from megatron_grm.data import Example, ExampleError, Turn
from megatron_grm.data.examples import permute_example, shuffle_responses

CTX = (Turn("user", "q"),)


def test_permute_example_moves_label_and_ranking_with_the_responses():
    ex = Example(CTX, ("best", "mid", "worst"), 0, "t", "1", ranking=(0, 1, 2))
    moved = permute_example(ex, [2, 0, 1])  # shown order: worst, best, mid
    assert moved.responses == ("worst", "best", "mid")
    assert moved.responses[moved.label] == "best"
    assert [moved.responses[i] for i in moved.ranking] == ["best", "mid", "worst"]


def test_shuffle_responses_keeps_the_best_response_labelled():
    ex = Example(CTX, tuple(f"r{i}" for i in range(6)), 4, "t", "1")
    positions = set()
    for seed in range(30):
        shuffled = shuffle_responses(ex, random.Random(seed))
        assert shuffled.responses[shuffled.label] == "r4"
        assert sorted(shuffled.responses) == sorted(ex.responses)
        positions.add(shuffled.label)
    assert len(positions) > 3


def test_single_response_label_is_unchanged_by_permutation():
    ex = Example(CTX, ("only",), 1, "t", "1")
    assert permute_example(ex, [0]).label == 1


def test_lists_are_stored_as_tuples_and_examples_compare_by_value():
    a = Example([Turn("user", "q")], ["x", "y"], 1, "t", "1", ranking=[1, 0])
    assert isinstance(a.context, tuple) and isinstance(a.responses, tuple) and a.ranking == (1, 0)
    assert a == Example(CTX, ("x", "y"), 1, "t", "1", ranking=(1, 0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"source": ""}, "source"),
        ({"id": ""}, "id"),
        ({"ranking": (0,), "responses": ("a",), "label": 0}, "ranking"),
        ({"preference_strength": float("nan")}, "preference_strength"),
        ({"category": 3}, "category"),
    ],
)
def test_invalid_fields_are_named(kwargs, field):
    base = {"context": CTX, "responses": ("a", "b"), "label": 0, "source": "t", "id": "1"}
    with pytest.raises(ExampleError) as info:
        Example(**{**base, **kwargs})
    assert info.value.field == field
