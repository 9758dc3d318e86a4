"""Synthetic, labelled judgments in the RFT sample-file format, for the MetaRM and evaluation tests.

Arithmetic examples ("What is A+B?", compact GRM template) judged three ways: the arithmetic teacher
(right 70% of the time, paper Eq. 10 decides), a tie (``\\boxed{5, 5}``: never correct, ties are not
strictly higher) and a judgment cut after its principles (unparseable: incorrect). The cut ones are what
a tiny model learns to spot in a minute; the ties and the teacher's arithmetic slips are not. A few
hinted records are added: the MetaRM stage must leave them out.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from megatron_grm.data.arithmetic import arithmetic_examples, teacher_judgment
from megatron_grm.spct import build_prompt, is_correct, parse_judgment

KINDS = ("teacher", "tie", "cut")


def synthetic_judgment_records(num_examples: int, per_example: int = 2, seed: int = 0,
                               hinted: int = 3) -> list[dict]:
    examples = arithmetic_examples("train", num_examples, seed)
    rng = random.Random(f"metarm-synthetic:{seed}")
    records = []
    for ex in examples:
        prompt = build_prompt(ex, variant="compact")
        for _ in range(per_example):
            kind = rng.choices(KINDS, weights=(2, 1, 1))[0]
            text = teacher_judgment(ex, rng, accuracy=0.7)
            if kind == "tie":
                text = re.sub(r"\\boxed\{[^}]*\}", r"\\boxed{5, 5}", text)
            elif kind == "cut":  # stopped after its principles, as a generation that hit its token limit
                text = text[:text.index("Analysis")]
            scores = parse_judgment(text, ex.num_responses).scores
            records.append({"example_id": ex.id, "prompt": prompt, "text": text, "scores": scores,
                            "correct": is_correct(scores, label=ex.label), "hinted": False, "kind": kind,
                            "finish_reason": "stop"})  # an extra field the reader must tolerate
    for ex in examples[:hinted]:
        text = teacher_judgment(ex, rng, accuracy=1.0)
        records.append({"example_id": ex.id, "prompt": build_prompt(ex, variant="compact"), "text": text,
                        "scores": parse_judgment(text, 2).scores, "correct": True, "hinted": True})
    return records


def write_records(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
