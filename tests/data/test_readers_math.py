"""Verifiable math pairs from champ-dataset and reasoning-gym: labels agree with the answer checks."""

import json
import random
import re
from decimal import Decimal

import pytest

from megatron_grm.data.readers.common import RecordError
from megatron_grm.data.readers.verifiable_math import (
    champ_dataset_path,
    champ_verdict,
    corrupt_answer,
    integers_in,
    read_champ,
    read_reasoning_gym,
    replace_final_answer,
)

reasoning_gym = pytest.importorskip("reasoning_gym")


def test_integers_in_reads_thousands_separators_and_skips_decimals():
    assert integers_in("There are 2,001,000 ways; 3.5 is not; -4 is; x_6=70+99.") == {2001000, -4, 6, 70, 99}


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ("There are 239 such strings.", True),
        ("The total is 29 strings of length 6.", False),  # 29 is a new number, 239 is absent
        ("Strings of length 6 with digits 1, 2, 3.", None),  # only numbers restated from the problem
        ("It is impossible.", None),
    ],
)
def test_champ_verdict(summary, expected):
    problem = "Strings of digits 1, 2, 3 of length 6: how many?"
    assert champ_verdict(summary, 239, problem) is expected


@pytest.fixture(scope="module")
def champ_raw():
    return json.loads(champ_dataset_path().read_text())


@pytest.fixture(scope="module")
def small_champ(champ_raw, tmp_path_factory):
    """The first 30 problems of CHAMP in a file of their own: fast to read repeatedly."""
    keep = sorted(champ_raw["problems"])[:30]
    data = {**champ_raw, "problems": {k: champ_raw["problems"][k] for k in keep}}
    path = tmp_path_factory.mktemp("champ") / "v0.json"
    path.write_text(json.dumps(data))
    return path


def test_champ_pairs_pair_a_correct_with_an_incorrect_solution(champ_raw):
    result = read_champ()
    assert result.num_skipped == 0
    assert result.excluded["non-integer reference answer"] > 100
    examples = result.examples
    problems = {ex.id.split("/")[1] for ex in examples}
    assert len(problems) >= 50 and len(examples) <= 4 * len(problems)
    labels = [ex.label for ex in examples]
    assert 0.3 < sum(labels) / len(labels) < 0.7  # the correct solution is not always first

    for ex in examples:
        problem = champ_raw["problems"][ex.id.split("/")[1]]
        assert ex.query == problem["_text"] and ex.category == f"champ/{problem['category']}"
        answer = int(problem["_answer"])
        for key, should_be_correct in ((ex.metadata["correct"], True), (ex.metadata["incorrect"], False)):
            summary = problem["conversations"][key]["messages"][-1]["text"]
            assert (answer in integers_in(summary)) is should_be_correct
        correct_text = problem["conversations"][ex.metadata["correct"]]["messages"][-3]["text"].strip()
        assert ex.responses[ex.label] == correct_text


def test_champ_pairs_past_the_cap_are_counted_not_lost(small_champ):
    """Every correct x incorrect combination of a problem is either an example or counted as excluded."""
    capped = read_champ(small_champ, max_pairs_per_problem=1)
    all_pairs = read_champ(small_champ, max_pairs_per_problem=10**6)
    assert "pairs beyond max_pairs_per_problem" not in all_pairs.excluded
    beyond = capped.excluded["pairs beyond max_pairs_per_problem"]
    assert beyond > 0 and len(capped.examples) + beyond == len(all_pairs.examples)


def test_champ_pairs_are_deterministic_from_the_seed(small_champ):
    first = [(e.id, e.label) for e in read_champ(small_champ).examples]
    assert first and first == [(e.id, e.label) for e in read_champ(small_champ).examples]
    assert first != [(e.id, e.label) for e in read_champ(small_champ, seed=1).examples]


def test_champ_single_mode_gives_zero_one_labels(small_champ):
    singles = read_champ(small_champ, mode="single").examples
    assert {ex.num_responses for ex in singles} == {1}
    assert {ex.label for ex in singles} == {0, 1}


def test_champ_malformed_problem_is_named(small_champ, tmp_path):
    data = json.loads(small_champ.read_text())
    first = sorted(data["problems"])[0]
    del data["problems"][first]["conversations"]
    path = tmp_path / "v0.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=rf"record {first}: field 'conversations': missing"):
        read_champ(path)
    assert read_champ(path, on_error="skip").num_skipped == 1


def _final_number(text):
    return re.findall(r"-?\d+(?:\.\d+)?", text)[-1]


@pytest.mark.parametrize("dataset", ["gsm_symbolic", "basic_arithmetic", "chain_sum"])
def test_reasoning_gym_pairs_are_verified_correct_vs_corrupted(dataset):
    result = read_reasoning_gym(dataset, size=40, seed=7)
    generator = reasoning_gym.create_dataset(dataset, size=40, seed=7)
    assert len(result.examples) == 40 and result.num_skipped == 0
    for index, ex in enumerate(result.examples):
        entry = generator[index]
        assert ex.query == entry["question"]
        right, wrong = ex.responses[ex.label], ex.responses[1 - ex.label]
        assert generator.score_answer(_final_number(right), entry) == 1.0
        assert generator.score_answer(_final_number(wrong), entry) < 1.0
    assert {ex.label for ex in result.examples} == {0, 1}


def test_reasoning_gym_is_deterministic_and_single_mode_works():
    a = read_reasoning_gym("chain_sum", size=10, seed=3).examples
    assert a == read_reasoning_gym("chain_sum", size=10, seed=3).examples
    singles = read_reasoning_gym("chain_sum", size=30, seed=3, mode="single").examples
    assert {ex.num_responses for ex in singles} == {1} and {ex.label for ex in singles} == {0, 1}


def test_reasoning_gym_non_integer_answers_are_reported():
    with pytest.raises(
        RecordError, match=r"reasoning_gym:spell_backward\(seed=0\): record 0: field 'answer'"
    ):
        read_reasoning_gym("spell_backward", size=3)
    assert read_reasoning_gym("spell_backward", size=3, on_error="skip").num_skipped == 3


def test_corrupt_answer_and_replace_final_answer():
    rng = random.Random(0)
    for answer in [0, 1, 7, 150, 28080, -12, Decimal("1687.5")]:
        for _ in range(20):
            wrong = corrupt_answer(answer, rng)
            assert wrong != answer and (answer < 0 or wrong >= 0)
    text = "We had 69 eggs.\nSo 108 - 39.0 = 69.0 eggs, not 169 or 6.9.\n#### 69.0"
    assert corrupt_answer(Decimal("1687.5"), rng).as_tuple().exponent == -1
    assert (
        replace_final_answer(text, 69, 67)
        == "We had 69 eggs.\nSo 108 - 39.0 = 67.0 eggs, not 169 or 6.9.\n#### 67.0"
    )
