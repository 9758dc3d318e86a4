"""Reading and writing judgments: principles, critique and ``Scores: \\boxed{s1, ..., sn}`` (paper §2.1-3.1).

A judgment is the text the GRM generates. The scores are extracted as the paper's ``f_extract``: the last
``\\boxed{...}`` after the ``Scores`` label, one integer per response. The label is "Scores" opening a line
or "scores:" anywhere, so the verb in "Response 1 scores higher" is not one. Scores are 1-10 for n >= 2
and 0/1 for the single-response template; anything else (wrong count, out of range, not an integer,
missing, or a last ``\\boxed`` that is malformed, which must not fall back to an earlier draft) makes the
judgment unparseable, which Eq. 10 counts as incorrect. Parsing never raises.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MULTI_SCORE_RANGE = (1, 10)
SINGLE_SCORE_RANGE = (0, 1)

# "Scores" opening a line (after Markdown's '#', '*' or '>'), with or without a colon; or "scores:" anywhere.
_SCORES_LABEL = re.compile(r"(?:^[ \t#*>]*scores\b[ \t*]*:?|\bscores[ \t*]*:)", re.IGNORECASE | re.MULTILINE)
_BOXED = re.compile(r"\\boxed[ \t]*\{([^{}]*)\}")
_BOXED_OPENING = re.compile(r"\\boxed[ \t]*\{")
_PRINCIPLES_LABEL = re.compile(r"specific criteria[ \t]*:", re.IGNORECASE)
_ANALYSIS_LABEL = re.compile(r"\banalysis[ \t]*:", re.IGNORECASE)
_BEST_LABEL = re.compile(r"\bbest\b", re.IGNORECASE)
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Judgment:
    """A parsed judgment. ``scores`` is None exactly when ``error`` says why it could not be parsed."""

    scores: list[int] | None
    principles: str
    critique: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.scores is not None


def score_range(num_responses: int) -> tuple[int, int]:
    """Allowed scores: 1-10 for the multi-response template, 0/1 for the single-response one."""
    return SINGLE_SCORE_RANGE if num_responses == 1 else MULTI_SCORE_RANGE


def render_judgment(principles: str, critique: str, scores: Sequence[int]) -> str:
    """The canonical judgment text the GRM is trained to write (three labelled parts, as in the prompt)."""
    if len(scores) == 0:
        raise ValueError("a judgment needs at least one score")
    boxed = ", ".join(str(int(s)) for s in scores)
    return (
        f"Specific Criteria: {principles.strip()}\nAnalysis: {critique.strip()}\nScores: \\boxed{{{boxed}}}"
    )


def parse_judgment(text: str, num_responses: int, allowed: tuple[int, int] | None = None) -> Judgment:
    """Extract principles, critique and scores from a generated judgment; never raises.

    ``allowed`` overrides the inclusive score range (default :func:`score_range` of ``num_responses``).
    """
    try:
        return _parse(text, num_responses, allowed)
    except Exception as exc:  # a parser bug must not take down a rollout; report it as unparseable
        return Judgment(None, "", "", f"internal parse error: {type(exc).__name__}: {exc}")


def _parse(text: str, num_responses: int, allowed: tuple[int, int] | None) -> Judgment:
    if not isinstance(text, str):
        return Judgment(None, "", "", f"judgment must be a string, got {type(text).__name__}")
    if not isinstance(num_responses, int) or num_responses < 1:
        return Judgment(None, "", "", f"num_responses must be a positive integer, got {num_responses!r}")
    lo, hi = allowed if allowed is not None else score_range(num_responses)

    labels = list(_SCORES_LABEL.finditer(text))
    if not labels:
        return Judgment(None, *_sections(text, len(text)), "no 'Scores' label")
    openings = list(_BOXED_OPENING.finditer(text, labels[0].end()))
    if not openings:
        return Judgment(None, *_sections(text, labels[-1].start()), "no \\boxed{...} after 'Scores'")
    box = _BOXED.match(text, openings[-1].start())
    if box is None:
        return Judgment(None, *_sections(text, labels[-1].start()),
                        "no \\boxed{...} of plain scores after 'Scores': the last \\boxed is malformed")
    marker = [m for m in labels if m.start() < box.start()][-1]
    principles, critique = _sections(text, marker.start())

    items = box.group(1).split(",")
    if len(items) == 1 and not items[0].strip():
        items = []
    if len(items) != num_responses:
        return Judgment(None, principles, critique, f"expected {num_responses} score(s), got {len(items)}")
    scores = []
    for item in items:
        token = item.strip()
        if not _INTEGER.fullmatch(token):
            return Judgment(None, principles, critique, f"score {token!r} is not an integer")
        # Bound the length first: int() of a huge digit string is slow and Python caps it anyway.
        if len(token) > 12 or not lo <= int(token) <= hi:
            return Judgment(None, principles, critique, f"score {token[:12]} outside [{lo}, {hi}]")
        value = int(token)
        scores.append(value)
    return Judgment(scores, principles, critique, None)


def _sections(text: str, end: int) -> tuple[str, str]:
    """Principles (after 'Specific Criteria:') and critique (after 'Analysis:') in ``text[:end]``."""
    head = text[:end]
    p = _PRINCIPLES_LABEL.search(head)
    a = _ANALYSIS_LABEL.search(head, p.end() if p else 0)
    if p and a:
        return head[p.end() : a.start()].strip(), head[a.end() :].strip()
    if p:
        return head[p.end() :].strip(), ""
    if a:
        return "", head[a.end() :].strip()
    return "", head.strip()


def parse_best_choice(text: str, num_responses: int) -> int | None:
    """The LLM-as-a-judge baseline's answer: the last ``\\boxed{j}`` after 'Best', as a 0-based index.

    Returns None when missing or out of range; never raises.
    """
    try:
        if not isinstance(text, str) or not isinstance(num_responses, int):
            return None
        label = _BEST_LABEL.search(text)
        if label is None:
            return None
        boxes = list(_BOXED.finditer(text, label.end()))
        if not boxes:
            return None
        token = boxes[-1].group(1).strip()
        if not _INTEGER.fullmatch(token):
            return None
        choice = int(token) if len(token) <= 12 else 0
        return choice - 1 if 1 <= choice <= num_responses else None
    except Exception:
        return None


def choice_scores(choice: int | None, num_responses: int) -> list[int] | None:
    """A baseline choice as one-hot scores, so it can be voted on and measured like a GRM judgment."""
    if choice is None:
        return None
    return [1 if i == choice else 0 for i in range(num_responses)]
