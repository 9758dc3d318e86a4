"""GRPO validation: the mean rule reward of sampled judgments on examples the run does not train on.

GRPO maximises the expected rule reward of judgments sampled at the rollout's temperature, so that is
what validation measures: ``grpo.val_samples`` judgments per ``data.val`` example with the rollout's
sampling settings, at step 0, every ``grpo.val_interval`` steps and at the last step.

Every validation draws with the same seed and shows each example's responses in the same orders. With
the rollout engine's per-request streams, a judgment whose tokens the updates did not change is drawn
again token for token, so the gain over the first validation is a *paired* difference (common random
numbers): most of the sampling noise cancels and its standard error is far below that of two
independent means of the same size (docs/rft.md, "GRPO validation"). The first validation's
per-example rewards travel in the checkpoint, so a resumed run keeps measuring against the same start.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from megatron_grm.data.examples import Example
from megatron_grm.parallel.distributed import data_parallel_rank_and_size, sum_over_data_parallel
from megatron_grm.rollout.judgments import sample_judgments
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.spct import paired_difference, rule_reward

log = logging.getLogger(__name__)


class RewardValidation:
    """Sampled-judgment rule reward on fixed examples, paired across the steps of one run."""

    def __init__(self, engine, tokenizer, examples: Sequence[Example], samples: int, sampling: SamplingConfig,
                 variant: str, chat: bool, seed: int) -> None:
        if len(examples) < 2:
            raise ValueError(f"GRPO validation: data.val holds {len(examples)} usable example(s); the paired "
                             "standard error of the gain needs at least 2")
        if samples < 1:
            raise ValueError(f"grpo.val_samples must be >= 1, got {samples}")
        self.engine, self.tokenizer, self.examples, self.samples = engine, tokenizer, list(examples), samples
        self.variant, self.chat = variant, chat
        # Its own seed (the rollouts draw with seed + 7919 * rollout), the same at every validation.
        val_seed = zlib.crc32(f"grpo-validation:{seed}".encode())
        self.sampling = dataclasses.replace(sampling, seed=val_seed)
        self.orders = f"grpo-validation:{seed}"  # per-example response orders (rollout.judgments.response_orders)
        self.baseline: list[float] | None = None  # per-example mean reward at the first validation
        self.baseline_step: int | None = None

    def run(self, step: int) -> dict[str, float]:
        """Validate the engine's current weights (collective: every rank calls it). Returns the metrics."""
        rank, size = data_parallel_rank_and_size()
        mine = list(range(rank, len(self.examples), size))
        judged = sample_judgments(self.engine, self.tokenizer, [self.examples[i] for i in mine], self.samples,
                                  self.sampling, self.orders, variant=self.variant, chat=self.chat)
        k = self.samples
        # Every rank fills its own examples' slots; the sum over the data-parallel group fills them all.
        rewards = torch.zeros(len(self.examples), dtype=torch.float64)
        counts = torch.zeros(3, dtype=torch.float64)  # correct, unparseable, generated tokens
        for slot, i in enumerate(mine):
            group = judged[slot * k:(slot + 1) * k]
            rewards[i] = sum(rule_reward(j.scores, label=self.examples[i].label) for j in group) / k
            counts += torch.tensor([sum(j.correct for j in group), sum(j.scores is None for j in group),
                                    sum(len(j.token_ids) for j in group)], dtype=torch.float64)
        sum_over_data_parallel(rewards, counts)
        per_example = rewards.tolist()
        if self.baseline is None:
            self.baseline, self.baseline_step = per_example, step
        gain, gain_se = paired_difference(self.baseline, per_example)
        judgments = len(self.examples) * k
        metrics = {
            "reward_mean": sum(per_example) / len(per_example),
            "accuracy": float(counts[0]) / judgments,
            "unparseable_fraction": float(counts[1]) / judgments,
            "response_length": float(counts[2]) / judgments,
            "reward_gain": gain,
            "reward_gain_se": gain_se,
        }
        log.info("GRPO validation at step %d: reward %+.4f, gain over step %d %+.4f ± %.4f (paired SE), accuracy "
                 "%.4f, unparseable %.4f (%d examples x %d judgments)", step, metrics["reward_mean"],
                 self.baseline_step, gain, gain_se, metrics["accuracy"], metrics["unparseable_fraction"],
                 len(self.examples), k)
        return metrics

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "baseline_step": self.baseline_step, "num_examples": len(self.examples),
                "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("baseline") is None:
            return
        saved = (state["num_examples"], state["samples"])
        if saved != (len(self.examples), self.samples):
            raise ValueError(f"resuming GRPO validation with {len(self.examples)} examples x {self.samples} "
                             f"judgments (data.val, grpo.val_samples); the checkpoint's baseline has {saved[0]} x "
                             f"{saved[1]}")
        self.baseline, self.baseline_step = list(state["baseline"]), int(state["baseline_step"])

