"""The arithmetic demo task: deterministic, disjoint splits, short prompts, a teacher of known accuracy."""

import random
import re

import pytest

from megatron_grm.data import Example, Turn
from megatron_grm.data.arithmetic import (
    arithmetic_examples,
    digit_facts,
    operand_pairs,
    operands,
    teacher_judgment,
)
from megatron_grm.data.readers.jsonl import read_jsonl, write_jsonl
from megatron_grm.spct import build_prompt, is_correct, parse_judgment


def test_splits_partition_all_pairs_and_are_disjoint():
    train, heldout = set(operand_pairs("train")), set(operand_pairs("heldout"))
    assert not train & heldout
    assert len(train | heldout) == 40 * 40 and len(heldout) == 400
    assert all(10 <= a <= 49 and 10 <= b <= 49 for a, b in train | heldout)
    assert set(operand_pairs("heldout", split_seed=1)) != heldout


def test_examples_are_deterministic_from_the_seed():
    a = arithmetic_examples("train", 50, seed=3)
    assert a == arithmetic_examples("train", 50, seed=3)
    assert a != arithmetic_examples("train", 50, seed=4)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_examples_have_one_right_and_one_nearly_right_answer_from_their_split(split):
    pairs = set(operand_pairs(split))
    examples = arithmetic_examples(split, 400, seed=0)
    labels = []
    for ex in examples:
        a, b = operands(ex)
        assert (a, b) in pairs and ex.query == f"What is {a}+{b}?"
        right, wrong = int(ex.responses[ex.label]), int(ex.responses[1 - ex.label])
        assert right == a + b and wrong - right in (-2, -1, 1, 2)
        labels.append(ex.label)
    assert 0.4 < sum(labels) / len(labels) < 0.6
    if split == "heldout":  # 400 held-out examples use each held-out pair exactly once
        assert len({operands(ex) for ex in examples}) == 400


def test_teacher_critique_adds_the_units_digits_and_compares_them_before_each_verdict():
    ex = Example((Turn("user", "What is 23+24?"),), ("47", "46"), 0, "arithmetic", "x")
    judgment = teacher_judgment(ex, random.Random(0), accuracy=1.0)
    assert "Analysis: 23+24: 3+4 = 7. 1: 47, 7 vs 7 right. 2: 46, 7 vs 6 wrong.\n" in judgment
    assert judgment.endswith("Scores: \\boxed{8, 3}")
    carry = Example((Turn("user", "What is 18+25?"),), ("42", "43"), 1, "arithmetic", "x")
    assert "Analysis: 18+25: 8+5 = 13. 1: 42, 3 vs 2 wrong. 2: 43, 3 vs 3 right.\n" in teacher_judgment(
        carry, random.Random(0), accuracy=1.0)


def test_an_erring_teacher_stays_self_consistent_but_is_incorrect():
    ex = Example((Turn("user", "What is 23+24?"),), ("47", "46"), 0, "arithmetic", "x")
    judgment = teacher_judgment(ex, random.Random(0), accuracy=0.0)
    assert (
        "Analysis: 23+24: 3+4 = 6. 1: 47, 6 vs 7 wrong. 2: 46, 6 vs 6 right.\n" in judgment
    )
    carry = Example((Turn("user", "What is 18+25?"),), ("41", "43"), 1, "arithmetic", "x")
    assert "18+25: 8+5 = 11. 1: 41, 1 vs 1 right." in teacher_judgment(carry, random.Random(0), accuracy=0.0)
    assert not is_correct(parse_judgment(judgment, 2).scores, label=ex.label)


@pytest.mark.parametrize("accuracy", [0.0, 0.7, 1.0])
def test_teacher_accuracy_under_eq10(accuracy):
    rng = random.Random(1)
    examples = arithmetic_examples("train", 1000, seed=1)
    correct = [
        is_correct(parse_judgment(teacher_judgment(ex, rng, accuracy), 2).scores, label=ex.label)
        for ex in examples
    ]
    assert abs(sum(correct) / len(correct) - accuracy) < 0.04


def test_compact_prompt_stays_under_200_characters():
    for ex in arithmetic_examples("heldout", 400, seed=0):
        assert len(build_prompt(ex, variant="compact")) <= 200
        assert len(build_prompt(ex, variant="compact", hint=True)) <= 200
        assert len(teacher_judgment(ex, random.Random(0))) <= 200


def test_examples_survive_a_jsonl_round_trip(tmp_path):
    examples = arithmetic_examples("heldout", 20, seed=2)
    write_jsonl(examples, tmp_path / "arith.jsonl")
    back = read_jsonl(tmp_path / "arith.jsonl").examples
    assert back == examples and [operands(ex) for ex in back] == [operands(ex) for ex in examples]


def test_operands_rejects_other_questions():
    with pytest.raises(ValueError, match="not an arithmetic question"):
        operands(Example((Turn("user", "What is love?"),), ("a", "b"), 0, "t", "x"))


def test_digit_facts_are_correct_single_digit_sums_covering_the_table():
    lines = digit_facts(2000, seed=0)
    facts = [tuple(map(int, re.fullmatch(r"(\d)\+(\d) = (\d+)\.", line).groups())) for line in lines]
    assert all(a + b == c for a, b, c in facts)
    assert {(a, b) for a, b, _ in facts} == {(a, b) for a in range(10) for b in range(10)}
    assert lines == digit_facts(2000, seed=0) and lines != digit_facts(2000, seed=1)
