"""Held-out Eq. 10 accuracy of the GRM with greedy decoding (paper §5.1: default results are greedy).

RFT, GRPO and the demo all ask the same question after (and before) training: on examples the model
never trained on, how often does one greedy judgment give the labelled best response the strictly
highest score? The responses are shown in a seeded random order, as during training, so a model that
learned a position bias gains nothing. Data-parallel replicas split the examples and the counts are
summed, so every rank returns the same number.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from megatron_grm.data.examples import Example, shuffle_responses
from megatron_grm.parallel.distributed import data_parallel_rank_and_size, sum_over_data_parallel
from megatron_grm.rollout.judgments import JudgmentSample, report_too_long, sample_judgments, split_by_prompt_room
from megatron_grm.rollout.sampling import SamplingConfig

log = logging.getLogger(__name__)


def greedy_judgments(
    trainer_or_model,
    tokenizer,
    examples: Sequence[Example],
    variant: str = "default",
    chat: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    **engine_options: Any,
) -> list[JudgmentSample]:
    """This data-parallel rank's share of the examples (every ``dp``-th one), one greedy judgment each.

    ``example_index`` of a returned judgment counts within this rank's share.
    """
    from megatron_grm.rollout.engine import RolloutEngine

    model = getattr(trainer_or_model, "unwrapped", trainer_or_model)
    sampling = dataclasses.replace(sampling or SamplingConfig(), greedy=True)
    rank, size = data_parallel_rank_and_size()
    # Example i is shown in the same (seeded) response order whatever the DP size and rank.
    shown = [shuffle_responses(ex, random.Random(f"heldout:{seed}:{i}")) for i, ex in enumerate(examples)]
    engine = RolloutEngine(model, tokenizer, **{"progress": False, **engine_options})
    return sample_judgments(engine, tokenizer, shown[rank::size], n=1, sampling=sampling, rng=random.Random(seed),
                            variant=variant, chat=chat, shuffle=False)


def heldout_accuracy(
    trainer_or_model,
    tokenizer,
    examples: Sequence[Example],
    variant: str = "default",
    chat: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    **engine_options: Any,
) -> float:
    """Fraction of ``examples`` whose greedy judgment is correct by Eq. 10 (unparseable = incorrect);
    examples whose prompt leaves no room for the judgment are left out, with a warning naming them.

    ``trainer_or_model`` is a :class:`~megatron_grm.train.loop.Trainer` or its (unwrapped) GPTModel;
    ``sampling`` sets ``max_new_tokens`` and stop strings (greedy is forced); ``engine_options`` go to the
    :class:`~megatron_grm.rollout.engine.RolloutEngine` (``max_tokens_in_flight``, ``max_batch_size``, ...).
    Collective: every rank calls it with the same examples and gets the same accuracy.
    """
    if not examples:
        raise ValueError("heldout_accuracy: no examples")
    from megatron.core.utils import unwrap_model

    limit = unwrap_model(getattr(trainer_or_model, "unwrapped", trainer_or_model)).max_sequence_length
    max_new = (sampling or SamplingConfig()).max_new_tokens
    examples, too_long = split_by_prompt_room(examples, tokenizer, variant, chat, max_new, limit)
    report_too_long("held-out accuracy", too_long, len(examples) + len(too_long), max_new, limit,
                    "model.max_position_embeddings")
    if not examples:
        raise ValueError("heldout_accuracy: no example leaves room for the judgment")
    judgments = greedy_judgments(trainer_or_model, tokenizer, examples, variant, chat, sampling, seed,
                                 **engine_options)
    counts = torch.tensor([sum(j.correct for j in judgments), len(judgments)], dtype=torch.float64)
    sum_over_data_parallel(counts)
    if int(counts[1]) != len(examples):
        raise RuntimeError(f"heldout_accuracy: {int(counts[1])} judgments for {len(examples)} examples")
    accuracy = float(counts[0] / counts[1])
    log.info("held-out Eq. 10 accuracy (greedy): %.4f on %d examples", accuracy, len(examples))
    return accuracy

