"""Metrics on fixed scores agree with straightforward reference computations (and scikit-learn)."""

import json
import random
import statistics

import pytest
from sklearn.metrics import roc_auc_score

from megatron_grm.spct import (
    accuracy,
    best_of_n_accuracy,
    category_prefix,
    macro_average,
    mcnemar_p,
    paired_difference,
    pairwise_accuracy,
    per_category,
    prediction_accuracy,
    results_markdown,
    roc_auc,
    write_results,
)

RNG = random.Random(1234)
# A fixed benchmark: 300 examples with 2-5 responses, integer scores 1-10 (so ties happen), some unparseable.
FIXED = []
for _ in range(300):
    n = RNG.randint(2, 5)
    scores = None if RNG.random() < 0.1 else [RNG.randint(1, 10) for _ in range(n)]
    FIXED.append((scores, RNG.randrange(n), n, RNG.choice(["Help/Chat", "Help/Code", "Harm/S1"])))


def test_best_of_n_accuracy_matches_a_reference_loop():
    hits = 0
    for scores, best, _, _ in FIXED:
        if scores is None:
            continue
        if all(scores[best] > scores[j] for j in range(len(scores)) if j != best):
            hits += 1
    expected = hits / len(FIXED)
    assert best_of_n_accuracy([s for s, *_ in FIXED], [b for _, b, *_ in FIXED]) == pytest.approx(expected)
    assert 0.05 < expected < 0.6  # the fixed set really mixes hits, ties and misses


def test_pairwise_accuracy_matches_a_reference_loop():
    chosen = [RNG.randint(1, 10) for _ in range(200)] + [None]
    rejected = [RNG.randint(1, 10) for _ in range(200)] + [3]
    expected = sum(1 for c, r in zip(chosen, rejected) if c is not None and c > r) / len(chosen)
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(expected)
    assert pairwise_accuracy([5, 5, 7], [5, 4, 9]) == pytest.approx(1 / 3)  # ties count as wrong


def test_prediction_accuracy_and_accuracy():
    assert prediction_accuracy([0, 1, 2, 0], [0, 1, 1, 1]) == 0.5
    assert accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        accuracy([])


def test_roc_auc_hand_case():
    # Positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied: chance


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_agrees_with_scikit_learn(seed):
    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(250)] + [0, 1]
    # Voted scores of a single-response set: sums of k = 8 binary verdicts, so heavily tied.
    scores = [sum(rng.random() < (0.65 if y else 0.4) for _ in range(8)) for y in labels]
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    floats = [rng.gauss(y, 1.0) for y in labels]
    assert roc_auc(floats, labels) == pytest.approx(roc_auc_score(labels, floats), abs=1e-12)


@pytest.mark.parametrize(("scores", "labels"), [([1, 2], [1, 1]), ([1, 2], [0, 2]), ([1], [0, 1])])
def test_roc_auc_rejects_degenerate_input(scores, labels):
    with pytest.raises(ValueError):
        roc_auc(scores, labels)


def test_per_category_and_macro_average_match_a_reference_computation():
    correct = [s is not None and all(s[b] > x for j, x in enumerate(s) if j != b) for s, b, _, _ in FIXED]
    categories = [c for *_, c in FIXED]
    reference = {}
    for c in sorted(set(categories)):
        members = [ok for ok, cat in zip(correct, categories) if cat == c]
        reference[c] = sum(members) / len(members)
    assert per_category(correct, categories) == pytest.approx(reference)
    assert macro_average(per_category(correct, categories)) == pytest.approx(sum(reference.values()) / 3)

    by_goal = per_category(correct, categories, depth=1)
    assert set(by_goal) == {"Help", "Harm"}
    help_members = [ok for ok, cat in zip(correct, categories) if cat.startswith("Help/")]
    assert by_goal["Help"] == pytest.approx(sum(help_members) / len(help_members))


def test_macro_average_weights_categories_equally():
    assert macro_average({"big": 1.0, "small": 0.0}) == 0.5
    assert per_category([1, 1, 1, 0], ["big", "big", "big", "small"]) == {"big": 1.0, "small": 0.0}


def test_category_prefix():
    assert category_prefix("Pairwise_set/Helpfulness/Chat/Discussion", 2) == "Pairwise_set/Helpfulness"
    assert category_prefix("a/b", None) == "a/b"
    assert category_prefix("a/b", 5) == "a/b"


RESULTS = {
    "LLM-as-a-Judge": {"RewardBench": 0.843, "PPE": 0.61},
    "GRM (greedy)": {"RewardBench": 0.862, "PPE": 0.649, "RMB": 0.703},
}


def test_results_markdown_rows_are_methods_columns_are_benchmarks():
    table = results_markdown(RESULTS, benchmarks=["RewardBench", "PPE", "RMB"])
    assert table == (
        "| Method | RewardBench | PPE | RMB | Overall |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| LLM-as-a-Judge | 84.3 | 61.0 | - | - |\n"
        "| GRM (greedy) | 86.2 | 64.9 | 70.3 | 73.8 |\n"
    )


def test_write_results_json_and_markdown(tmp_path):
    write_results(RESULTS, tmp_path / "out" / "results.json", tmp_path / "out" / "results.md")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == RESULTS
    assert (tmp_path / "out" / "results.md").read_text() == results_markdown(RESULTS)


def test_paired_difference_matches_the_standard_error_of_the_per_pair_differences():
    rng = random.Random(3)
    before = [rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0]) for _ in range(200)]
    after = [b + rng.choice([0.0, 0.0, 0.5, -0.5, 1.0]) for b in before]
    diffs = [a - b for a, b in zip(after, before)]
    mean, se = paired_difference(before, after)
    assert mean == pytest.approx(statistics.fmean(diffs))
    assert se == pytest.approx(statistics.stdev(diffs) / len(diffs) ** 0.5)
    # Pairing removes the spread between pairs: the unpaired standard error of the same means is larger.
    unpaired = (statistics.variance(before) / len(before) + statistics.variance(after) / len(after)) ** 0.5
    assert se < unpaired
    assert paired_difference([0.5, -1.0, 1.0], [0.5, -1.0, 1.0]) == (0.0, 0.0)
    assert paired_difference([0.0, 0.0], [1.0, 0.0]) == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(("before", "after"), [([0.0, 1.0], [1.0]), ([1.0], [0.0])])
def test_paired_difference_rejects_unpaired_or_single_values(before, after):
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference(before, after)


@pytest.mark.parametrize(("only_a", "only_b"), [(0, 0), (3, 3), (10, 2), (2, 10), (0, 7), (25, 40), (1, 0)])
def test_mcnemar_p_is_scipys_exact_two_sided_binomial_test_on_the_discordant_examples(only_a, only_b):
    from scipy.stats import binomtest

    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_p(only_a, only_b) == mcnemar_p(only_b, only_a)


def test_mcnemar_p_rejects_negative_counts():
    with pytest.raises(ValueError, match="mcnemar_p"):
        mcnemar_p(-1, 3)
