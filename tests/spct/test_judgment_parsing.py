"""parse_judgment / render_judgment: never raises, round-trips, and rejects every malformed score set."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_grm.spct import (
    choice_scores,
    parse_best_choice,
    parse_judgment,
    render_judgment,
    score_range,
)

# Fragments that steer random text into every branch of the parser.
FRAGMENTS = st.sampled_from(
    [
        "Scores",
        "scores:",
        "Scores: ",
        "\\boxed{",
        "\\boxed {",
        "}",
        "{",
        ",",
        " ",
        "\n",
        "Analysis:",
        "Specific Criteria:",
        "-",
        "+",
        ".",
        "7",
        "10",
        "0",
        "99999999999999999999999999",
        "x",
        "\\",
        "٣",
    ]
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), n=st.integers(min_value=-3, max_value=12))
def test_parse_judgment_never_raises_on_any_string(text, n):
    judgment = parse_judgment(text, n)
    assert (judgment.scores is None) == (judgment.error is not None)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(FRAGMENTS | st.text(max_size=5), max_size=40), n=st.integers(min_value=1, max_value=8))
def test_parse_judgment_never_raises_on_near_miss_judgments(parts, n):
    judgment = parse_judgment("".join(parts), n)
    assert (judgment.scores is None) == (judgment.error is not None)
    if judgment.scores is not None:
        lo, hi = score_range(n)
        assert len(judgment.scores) == n and all(lo <= s <= hi for s in judgment.scores)


@st.composite
def scored_judgment(draw):
    n = draw(st.integers(min_value=1, max_value=8))
    lo, hi = score_range(n)
    scores = draw(st.lists(st.integers(min_value=lo, max_value=hi), min_size=n, max_size=n))
    return n, scores


@settings(max_examples=300, deadline=None)
@given(case=scored_judgment(), principles=st.text(), critique=st.text())
def test_rendered_judgment_parses_back_to_its_scores(case, principles, critique):
    n, scores = case
    judgment = parse_judgment(render_judgment(principles, critique, scores), n)
    assert judgment.error is None
    assert judgment.scores == scores


# Without ':' no text can forge a section label, so principles and critique come back exactly.
PLAIN = st.text(alphabet=st.characters(blacklist_characters=":\\{}", blacklist_categories=("Cs",)))


@settings(max_examples=200, deadline=None)
@given(case=scored_judgment(), principles=PLAIN, critique=PLAIN)
def test_rendered_judgment_parses_back_to_its_principles_and_critique(case, principles, critique):
    n, scores = case
    judgment = parse_judgment(render_judgment(principles, critique, scores), n)
    assert judgment.principles == principles.strip()
    assert judgment.critique == critique.strip()


@pytest.mark.parametrize("n", range(1, 9))
def test_round_trip_for_every_n_from_1_to_8(n):
    lo, hi = score_range(n)
    scores = [lo + (i * 3) % (hi - lo + 1) for i in range(n)]
    text = render_judgment("Accuracy (60%), clarity (40%).", "Response 1 is fine.", scores)
    assert parse_judgment(text, n).scores == scores
    assert parse_judgment(text, n + 1).scores is None  # the count must match exactly


def test_render_judgment_layout():
    text = render_judgment(" P ", " C ", [8, 3])
    assert text == "Specific Criteria: P\nAnalysis: C\nScores: \\boxed{8, 3}"


@pytest.mark.parametrize(
    "text",
    [
        "Scores: \\boxed{7, 3}",
        "Scores:\\boxed{7,3}",
        "scores : \\boxed { 7 ,\n 3 }",
        "SCORES\n\n\\boxed{\t7,3\t}",
        "Scores: the first is better, so \\boxed{7, 3}.",
    ],
)
def test_whitespace_and_case_variants_are_accepted(text):
    assert parse_judgment(text, 2).scores == [7, 3]


def test_takes_the_last_boxed_after_scores():
    text = "Analysis: a draft \\boxed{1, 2}.\nScores: \\boxed{2, 9} no, on reflection \\boxed{9, 2}"
    assert parse_judgment(text, 2).scores == [9, 2]


def test_boxed_before_scores_label_is_ignored():
    judgment = parse_judgment("Analysis: I would say \\boxed{9, 2}.\nScores: none", 2)
    assert judgment.scores is None
    assert "boxed" in judgment.error


@pytest.mark.parametrize(
    "text",
    [
        "Analysis: Response 1 scores higher, I'd say \\boxed{9, 2}.\nScores: none",
        "Analysis: it scores \\boxed{9, 2} on my scale.",
    ],
)
def test_scores_used_as_a_verb_is_not_the_label(text):
    judgment = parse_judgment(text, 2)
    assert judgment.scores is None
    assert "Scores" in judgment.error


@pytest.mark.parametrize(
    "text", ["Final scores: \\boxed{7, 3}", "**Scores:** \\boxed{7, 3}", "## Scores\n\\boxed{7,3}"]
)
def test_markdown_and_prefixed_labels_are_accepted(text):
    assert parse_judgment(text, 2).scores == [7, 3]


def test_a_malformed_last_box_does_not_fall_back_to_an_earlier_one():
    judgment = parse_judgment("Scores: \\boxed{7, 3} then \\boxed{\\frac{1}{2}, 9}", 2)
    assert judgment.scores is None
    assert "the last \\boxed is malformed" in judgment.error


def test_sections_are_extracted():
    text = "Specific Criteria: correctness (70%).\nAnalysis: R1 right, R2 wrong.\nScores: \\boxed{9, 2}"
    judgment = parse_judgment(text, 2)
    assert judgment.principles == "correctness (70%)."
    assert judgment.critique == "R1 right, R2 wrong."
    assert judgment.ok


@pytest.mark.parametrize(
    ("text", "n", "reason"),
    [
        ("no label \\boxed{7, 3}", 2, "no 'Scores' label"),
        ("Scores: \\boxed{7, 3, 5}", 2, "expected 2 score(s), got 3"),
        ("Scores: \\boxed{7}", 2, "expected 2 score(s), got 1"),
        ("Scores: \\boxed{}", 2, "expected 2 score(s), got 0"),
        ("Scores: \\boxed{7, 3,}", 2, "expected 2 score(s), got 3"),
        ("Scores: \\boxed{7.5, 3}", 2, "is not an integer"),
        ("Scores: \\boxed{seven, 3}", 2, "is not an integer"),
        ("Scores: \\boxed{+7, 3}", 2, "is not an integer"),
        ("Scores: \\boxed{٣, 3}", 2, "is not an integer"),
        ("Scores: \\boxed{0, 3}", 2, "outside [1, 10]"),
        ("Scores: \\boxed{11, 3}", 2, "outside [1, 10]"),
        ("Scores: \\boxed{-1, 3}", 2, "outside [1, 10]"),
        ("Scores: \\boxed{" + "9" * 5000 + ", 3}", 2, "outside [1, 10]"),
        ("Scores: \\boxed{2}", 1, "outside [0, 1]"),
        ("Scores: \\boxed{7}", 1, "outside [0, 1]"),
        ("Scores: \\boxed{\\text{7}, 3}", 2, "no \\boxed"),
    ],
)
def test_malformed_scores_are_rejected_with_a_reason(text, n, reason):
    judgment = parse_judgment(text, n)
    assert judgment.scores is None
    assert reason in judgment.error


def test_single_response_accepts_zero_and_one():
    assert parse_judgment("Scores: \\boxed{0}", 1).scores == [0]
    assert parse_judgment("Scores: \\boxed{1}", 1).scores == [1]


def test_explicit_range_overrides_default():
    assert parse_judgment("Scores: \\boxed{0, 100}", 2, allowed=(0, 100)).scores == [0, 100]


def test_non_string_input_is_an_error_not_an_exception():
    assert parse_judgment(None, 2).error == "judgment must be a string, got NoneType"  # type: ignore[arg-type]
    assert parse_judgment("Scores: \\boxed{1}", 0).scores is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Analysis: close.\nBest: \\boxed{2}", 1),
        ("Best: \\boxed{ 1 }", 0),
        ("Best: \\boxed{3}", None),
        ("Best: \\boxed{0}", None),
        ("\\boxed{1}", None),
        ("Best: \\boxed{two}", None),
    ],
)
def test_parse_best_choice(text, expected):
    assert parse_best_choice(text, 2) == expected


def test_choice_scores_one_hot():
    assert choice_scores(1, 3) == [0, 1, 0]
    assert choice_scores(None, 3) is None
