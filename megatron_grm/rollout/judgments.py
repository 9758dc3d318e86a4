"""Sample SPCT judgments for examples: the one place RFT, GRPO and evaluation turn examples into rewards.

For each example and each of its ``n`` samples the responses are shown in a fresh random order (so the
model cannot learn or exploit position), the judgment is generated with the rollout engine, parsed, its
scores are mapped back to the original order and judged by Eq. 10. A malformed judgment is an incorrect
judgment (reward −1), never an exception.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_grm.data.examples import Example, permute_example
from megatron_grm.rollout.sampling import Sample, SamplingConfig
from megatron_grm.spct import build_prompt, is_correct, parse_judgment, unpermute_scores


@dataclass
class JudgmentSample:
    example_index: int
    permutation: list[int]  # position k showed original response permutation[k]
    hinted: bool
    prompt: str  # the prompt text shown (without the hint when hinted: what SFT trains on)
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    scores: list[int] | None  # in the example's original response order
    shown_scores: list[int] | None
    correct: bool
    parse_error: str | None
    finish_reason: str


def render_prompt(example: Example, perm: Sequence[int], variant: str, hint: bool, tokenizer, chat: bool) -> str:
    """The text the model continues: the GRM template on the permuted example, chat-formatted if asked."""
    shown = permute_example(example, perm)
    text = build_prompt(shown, variant=variant, hint=hint)
    return tokenizer.prompt_text(text, chat=chat) if chat else text


def sample_judgments(
    engine,
    tokenizer,
    examples: Sequence[Example],
    n: int,
    sampling: SamplingConfig,
    rng: random.Random,
    variant: str = "default",
    chat: bool = True,
    hint: bool = False,
    shuffle: bool = True,
) -> list[JudgmentSample]:
    """``n`` judgments per example, grouped by example (the order GRPO's groups need)."""
    requests: list[tuple[int, list[int]]] = []
    for i, example in enumerate(examples):
        for _ in range(n):
            perm = list(range(example.num_responses))
            if shuffle:
                rng.shuffle(perm)
            requests.append((i, perm))
    prompts = [render_prompt(examples[i], perm, variant, hint, tokenizer, chat) for i, perm in requests]
    prompt_ids = [tokenizer.encode(p, add_bos=tokenizer.uses_bos) for p in prompts]
    # Every request has its own prompt (own permutation): generate one sample each.
    samples: list[Sample] = engine.generate(prompt_ids, n=1, sampling=sampling)
    out = []
    for k, ((i, perm), ids, sample) in enumerate(zip(requests, prompt_ids, samples)):
        example = examples[i]
        text = sample.text if sample.text is not None else tokenizer.decode(sample.token_ids, skip_special=True)
        judgment = parse_judgment(text, example.num_responses)
        scores = unpermute_scores(judgment.scores, perm)
        correct = is_correct(scores, label=example.label)
        plain_prompt = render_prompt(example, perm, variant, False, tokenizer, chat) if hint else None
        out.append(JudgmentSample(
            example_index=i, permutation=perm, hinted=hint,
            prompt=plain_prompt if hint else prompts[k], prompt_ids=ids,
            token_ids=list(sample.token_ids), logprobs=list(sample.logprobs), text=text, scores=scores,
            shown_scores=judgment.scores, correct=correct, parse_error=judgment.error,
            finish_reason=sample.finish_reason,
        ))
    return out
