"""Sample SPCT judgments for examples: the one place RFT, GRPO and evaluation turn examples into rewards.

For each example and each of its ``n`` samples the responses are shown in a fresh random order (so the
model cannot learn or exploit position), the judgment is generated with the rollout engine, parsed, its
scores are mapped back to the original order and judged by Eq. 10. A malformed judgment is an incorrect
judgment (reward −1), never an exception.

The judged conversation and responses are data: a special token's string inside them (a response that
writes ``<|im_end|>``) is encoded as text (:func:`encode_grm_prompt`), so it cannot end the GRM's turn.

Stages leave out examples whose prompt leaves no room for the judgment (:func:`split_by_prompt_room`). A
shown order that tokenizes a few tokens longer than the checked one is not sent to the engine: its judgment
is an incorrect one with ``finish_reason="prompt_too_long"`` and no tokens, so one prompt cannot end a run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_grm.data.examples import Example, permute_example
from megatron_grm.rollout.sampling import Sample, SamplingConfig
from megatron_grm.spct import build_prompt, is_correct, parse_judgment, unpermute_scores

log = logging.getLogger(__name__)

PROMPT_TOO_LONG = "prompt_too_long"  # finish_reason of a judgment whose prompt left no room to write it


@dataclass
class JudgmentSample:
    example_index: int
    permutation: list[int]  # position k showed original response permutation[k]
    hinted: bool
    prompt: str  # the prompt text shown, chat formatting included (without the hint when hinted)
    grm_prompt: str  # the same before chat formatting: what SFT trains on, encoded by encode_grm_prompt
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    scores: list[int] | None  # in the example's original response order
    shown_scores: list[int] | None
    correct: bool
    parse_error: str | None
    finish_reason: str


def grm_prompt_text(example: Example, perm: Sequence[int], variant: str, hint: bool) -> str:
    """The GRM template on the example with its responses in order ``perm`` (before chat formatting)."""
    return build_prompt(permute_example(example, perm), variant=variant, hint=hint)


def render_prompt(example: Example, perm: Sequence[int], variant: str, hint: bool, tokenizer, chat: bool) -> str:
    """The text the model continues, chat-formatted if asked: for people and records; the ids come from
    :func:`encode_grm_prompt`."""
    text = grm_prompt_text(example, perm, variant, hint)
    return tokenizer.prompt_text(text, chat=chat) if chat else text


def encode_grm_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a GRM prompt (or the judge baseline's): the conversation and responses in it are
    data, so special-token strings inside them are encoded as text."""
    return tokenizer.encode_prompt(text, chat=chat, literal=True)


def response_orders(example: Example, n: int, rng: random.Random | str, shuffle: bool = True) -> list[list[int]]:
    """The ``n`` orders an example's responses are shown in: drawn from ``rng``, one generator shared with
    other examples, or from the example's own, ``Random(f"{rng}:{example.id}")`` when ``rng`` is a seed
    string (then they do not depend on which other examples share the call)."""
    orders = random.Random(f"{rng}:{example.id}") if isinstance(rng, str) else rng
    perms = []
    for _ in range(n):
        perm = list(range(example.num_responses))
        if shuffle:
            orders.shuffle(perm)
        perms.append(perm)
    return perms


def sample_judgments(
    engine,
    tokenizer,
    examples: Sequence[Example],
    n: int,
    sampling: SamplingConfig,
    rng: random.Random | str,
    variant: str = "default",
    chat: bool = True,
    hint: bool = False,
    shuffle: bool = True,
) -> list[JudgmentSample]:
    """``n`` judgments per example, grouped by example (the order GRPO's groups need).

    ``rng`` shuffles the responses (:func:`response_orders`); with a seed string, and the engine's
    per-request streams, an example's judgments do not depend on which other examples share the call
    (evaluation chunks, ranks).
    """
    requests = [(i, perm) for i, example in enumerate(examples) for perm in response_orders(example, n, rng, shuffle)]
    texts = [grm_prompt_text(examples[i], perm, variant, hint) for i, perm in requests]
    prompt_ids = [encode_grm_prompt(tokenizer, text, chat) for text in texts]
    # Every request has its own prompt (own permutation): generate one sample each.
    samples = generate_where_room(engine, prompt_ids, sampling)
    out = []
    for k, ((i, perm), ids, sample) in enumerate(zip(requests, prompt_ids, samples)):
        example = examples[i]
        if sample is None:
            sample = Sample(prompt_index=k, sample_index=0, prompt_ids=ids, token_ids=[], logprobs=[],
                            finish_reason=PROMPT_TOO_LONG, text="")
        text = sample.text if sample.text is not None else tokenizer.decode(sample.token_ids, skip_special=True)
        judgment = parse_judgment(text, example.num_responses)
        scores = unpermute_scores(judgment.scores, perm)
        correct = is_correct(scores, label=example.label)
        trained = grm_prompt_text(example, perm, variant, False) if hint else texts[k]
        out.append(JudgmentSample(
            example_index=i, permutation=perm, hinted=hint,
            prompt=tokenizer.prompt_text(trained, chat=chat), grm_prompt=trained, prompt_ids=ids,
            token_ids=list(sample.token_ids), logprobs=list(sample.logprobs), text=text, scores=scores,
            shown_scores=judgment.scores, correct=correct, parse_error=judgment.error,
            finish_reason=sample.finish_reason,
        ))
    return out


def generate_where_room(engine, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig
                        ) -> list[Sample | None]:
    """One sample per prompt from ``engine``, None for a prompt that leaves no room for ``max_new_tokens``
    in the model's context (it is not sent: the engine would refuse the whole call)."""
    room = [len(ids) + sampling.max_new_tokens <= engine.context_limit for ids in prompt_ids]
    generated = iter(engine.generate([ids for ids, ok in zip(prompt_ids, room) if ok], n=1, sampling=sampling))
    return [next(generated) if ok else None for ok in room]


def prompt_length(tokenizer, example: Example, variant: str, chat: bool, hint: bool = False) -> int:
    """Tokens of the example's GRM prompt with its responses in file order (``hint``: with the hint)."""
    identity = list(range(example.num_responses))
    return len(encode_grm_prompt(tokenizer, grm_prompt_text(example, identity, variant, hint), chat))


def split_by_prompt_room(examples: Sequence[Example], tokenizer, variant: str, chat: bool, max_new_tokens: int,
                         limit: int, hint: bool = False) -> tuple[list[Example], list[Example]]:
    """(examples whose prompt leaves ``max_new_tokens`` within ``limit`` positions, the others).

    ``hint``: measure the hinted prompt, the longer of the two an example may be sampled with."""
    fit, too_long = [], []
    for example in examples:
        room = prompt_length(tokenizer, example, variant, chat, hint) + max_new_tokens <= limit
        (fit if room else too_long).append(example)
    return fit, too_long


def report_too_long(stage: str, too_long: Sequence[Example], total: int, max_new_tokens: int, limit: int,
                    limit_name: str) -> None:
    """One warning naming the examples left out for length (up to 5 ids), so none vanishes unseen."""
    if too_long:
        ids = ", ".join(repr(e.id) for e in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        log.warning("%s: %d of %d examples leave no room for %d judgment tokens within %s=%d and are left out: %s",
                    stage, len(too_long), total, max_new_tokens, limit_name, limit, ids)
