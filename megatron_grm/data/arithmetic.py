"""A small, learnable GRM task for the CPU demo: "What is A+B?" with one right and one wrong answer.

A and B are in 10-49, so every sum has two digits and every example has the same length; the wrong
response is off by +-1 or +-2, so the two answers always differ in the units digit. The teacher's
critique reduces the check to steps a 1M-parameter model learns on CPU in minutes (docs/rft.md): copy the
operands, add their units digits (a single-digit fact), put that digit next to each response's units digit,
give the verdict ("23+24: 3+4 = 7. 1: 47, 7 vs 7 right. 2: 46, 7 vs 6 wrong."). A model that learns this
judges unseen pairs, which gives rejective fine-tuning, GRPO and voting a signal. Train and held-out splits
are disjoint by (A, B) pair, so held-out accuracy is not memorisation. Everything is deterministic from seeds.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from megatron_grm.data.examples import Example, Turn
from megatron_grm.spct.judgment import render_judgment

Split = Literal["train", "heldout"]
LOW, HIGH = 10, 49
OFFSETS = (-2, -1, 1, 2)
HELDOUT_FRACTION = 0.25
PRINCIPLES = "exact sum (100%)."
_QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")


def operand_pairs(
    split: Split, heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = 0
) -> list[tuple[int, int]]:
    """The (A, B) pairs of one split; the splits partition all 40 x 40 pairs, fixed by ``split_seed``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(f"arithmetic-split:{split_seed}").shuffle(pairs)
    n_heldout = round(len(pairs) * heldout_fraction)
    return sorted(pairs[:n_heldout] if split == "heldout" else pairs[n_heldout:])


def arithmetic_examples(
    split: Split, num: int, seed: int, heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = 0
) -> list[Example]:
    """``num`` examples from one split: each pair is used once before any pair repeats; the position of
    the right answer (label) and the wrong answer's offset are drawn from ``seed``."""
    pairs = operand_pairs(split, heldout_fraction, split_seed)
    rng = random.Random(f"arithmetic:{split}:{seed}")
    order: list[tuple[int, int]] = []
    examples = []
    for i in range(num):
        if not order:
            order = pairs[:]
            rng.shuffle(order)
        a, b = order.pop()
        right = a + b
        wrong = right + rng.choice(OFFSETS)
        label = rng.randrange(2)
        responses = (str(right), str(wrong)) if label == 0 else (str(wrong), str(right))
        examples.append(
            Example(
                context=(Turn("user", f"What is {a}+{b}?"),),
                responses=responses,
                label=label,
                source="arithmetic",
                id=f"arithmetic/{split}/{seed}/{i}",
                ranking=(label, 1 - label),
                category=f"arithmetic/{split}",
                metadata={"a": a, "b": b},
            )
        )
    return examples


def operands(example: Example) -> tuple[int, int]:
    """A and B, read from the question so any arithmetic example (e.g. one read back from JSONL) works."""
    match = _QUESTION.fullmatch(example.query.strip())
    if match is None:
        raise ValueError(f"example {example.id}: not an arithmetic question: {example.query!r}")
    return int(match.group(1)), int(match.group(2))


def teacher_judgment(
    example: Example, rng: random.Random, accuracy: float = 0.7, right_score: int = 8, wrong_score: int = 3
) -> str:
    """An SPCT-format judgment from a teacher that is right with probability ``accuracy``.

    The critique copies the operands, adds their units digits (a single-digit fact, taught by
    :func:`digit_facts`), then for each response puts that units digit next to the response's (the
    responses differ from the sum by 1 or 2, so the units digit decides) and gives the verdict: every step
    is short-range. When the teacher errs it writes the wrong response's units digit as the sum's, so its
    critique stays self-consistent and its scores favour the wrong response (Eq. 10 incorrect).
    """
    if not 0 <= accuracy <= 1:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    a, b = operands(example)
    values = [int(r) for r in example.responses]
    units_sum = a % 10 + b % 10
    claimed = units_sum % 10
    if rng.random() >= accuracy:
        claimed = next(v for v in values if v != a + b) % 10
    parts = [f"{a}+{b}: {a % 10}+{b % 10} = {units_sum // 10 * 10 + claimed}."]
    scores = []
    for i, v in enumerate(values, 1):
        right = v % 10 == claimed
        parts.append(f"{i}: {v}, {claimed} vs {v % 10} {'right' if right else 'wrong'}.")
        scores.append(right_score if right else wrong_score)
    return render_judgment(PRINCIPLES, " ".join(parts), scores)


def digit_facts(num: int, seed: int) -> list[str]:
    """``num`` lines "a+b = c." with single digits a, b: the general instruction data of the demo's SFT mix.

    The critique's only computation is such a fact; measured (docs/rft.md), the tiny model did not learn
    two-digit sums in the demo's budget, but learns this 100-entry table from ~30% of the mix. They say
    nothing about any two-digit pair, so held-out examples stay unseen.
    """
    rng = random.Random(f"arithmetic-facts:{seed}")
    return [f"{a}+{b} = {a + b}." for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(num))]
