"""Batch producers: turn samples into this DP rank's micro-batches for a given step, resumably.

The global batch for step ``s`` is a pure function of (seed, epoch order, consumed samples), so every
TP/PP rank builds the same batch and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Sample = tuple[Sequence[int], Sequence[float]]  # token ids and a 0/1 loss mask over the same positions


def epoch_order(num_samples: int, epoch: int, seed: int) -> np.ndarray:
    """A fresh permutation per epoch, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_batch_indices(start: int, size: int, num_samples: int, seed: int) -> list[int]:
    """Sample indices ``start .. start+size`` of the endless, epoch-shuffled stream."""
    out: list[int] = []
    pos = start
    while len(out) < size:
        epoch, offset = divmod(pos, num_samples)
        order = epoch_order(num_samples, epoch, seed)
        take = min(size - len(out), num_samples - offset)
        out.extend(int(i) for i in order[offset:offset + take])
        pos += take
    return out


class SampleBatchProducer:
    """Supervised micro-batches (masked next-token loss) from a list of pre-tokenized samples."""

    def __init__(
        self,
        samples: Sequence[Sample],
        global_batch_size: int,
        micro_batch_size: int,
        seq_length: int,
        pad_id: int,
        seed: int,
        collate: Callable[..., dict[str, torch.Tensor]] | None = None,
    ) -> None:
        from megatron.core import parallel_state

        from megatron_grm.data.packing import collate_padded

        if not samples:
            raise ValueError("no training samples")
        self.samples = samples
        self.gbs, self.mbs, self.seq_length = global_batch_size, micro_batch_size, seq_length
        self.pad_id, self.seed = pad_id, seed
        self.collate = collate or collate_padded
        distributed = torch.distributed.is_initialized()
        self.dp_rank = parallel_state.get_data_parallel_rank() if distributed else 0
        self.dp_size = parallel_state.get_data_parallel_world_size() if distributed else 1
        self.consumed = 0

    def next_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = global_batch_indices(self.consumed, self.gbs, len(self.samples), self.seed)
        self.consumed += self.gbs
        per_rank = self.gbs // self.dp_size
        mine = indices[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [
            self.collate([self.samples[i] for i in mine[j:j + self.mbs]], seq_length=self.seq_length,
                         pad_id=self.pad_id)
            for j in range(0, per_rank, self.mbs)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples") not in (None, len(self.samples)):
            raise ValueError(
                f"resuming with {len(self.samples)} samples but the checkpoint was written with "
                f"{state['num_samples']}: the data changed"
            )
        if state.get("seed") not in (None, self.seed):
            raise ValueError(f"resuming with trainer.seed={self.seed} but the checkpoint was written with seed "
                             f"{state['seed']}: the rest of the epoch would be another shuffle, repeating and "
                             "skipping samples")
        self.consumed = int(state["consumed"])


class LengthBucketedProducer(SampleBatchProducer):
    """Supervised micro-batches with little padding.

    Each step draws the same global batch as :class:`SampleBatchProducer`, sorts it by length, cuts it into
    micro-batches padded only to their own longest sample (rounded up to ``pad_multiple``) and deals them
    round-robin to the DP ranks. The loss is a token-weighted mean over the whole global batch, so the
    regrouping changes the padding and nothing else. With ``uniform_length`` (pipeline parallelism, whose
    schedule sends fixed shapes) all micro-batches of a step share the step's longest length.

    With ``pack``, the sorted batch is dealt to the ranks one sample at a time (each rank a like mix of
    lengths), and in each micro-batch consecutive samples share a row while they fit in its longest
    sample's width (block-diagonal causal attention, positions restarting per sample): a mix of short
    instruction pairs and long judgments then needs fewer rows, with the same loss terms. Megatron's
    bool mask for such rows is only honoured by attention that reads an arbitrary mask (the local spec's
    SDPA core), not by Transformer Engine's causal kernels: the stages that offer it check that.
    """

    def __init__(self, samples: Sequence[Sample], global_batch_size: int, micro_batch_size: int, seq_length: int,
                 pad_id: int, seed: int, pad_multiple: int = 8, uniform_length: bool = False,
                 pack: bool = False) -> None:
        super().__init__(samples, global_batch_size, micro_batch_size, seq_length, pad_id, seed)
        too_long = [i for i, s in enumerate(samples) if len(s[0]) > seq_length]
        if too_long:
            i = too_long[0]
            raise ValueError(f"sample {i} has {len(samples[i][0])} tokens > seq_length={seq_length}")
        self.lengths = [len(s[0]) for s in samples]
        self.pad_multiple, self.uniform_length, self.pack = pad_multiple, uniform_length, pack
        self.real_tokens = self.batch_tokens = 0
        self.last_step_waste = 0.0

    def _width(self, group: Sequence[int]) -> int:
        longest = max(self.lengths[i] for i in group)
        return min(self.seq_length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def next_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        from megatron_grm.data.packing import collate_padded, pack_documents, plan_rows

        indices = global_batch_indices(self.consumed, self.gbs, len(self.samples), self.seed)
        self.consumed += self.gbs
        by_length = sorted(indices, key=lambda i: self.lengths[i])
        if self.pack:  # rank r: sorted samples r, r + dp, ..., cut into micro-batches of mbs samples
            per_rank = [by_length[r::self.dp_size] for r in range(self.dp_size)]
            groups = [share[j:j + self.mbs] for share in per_rank for j in range(0, len(share), self.mbs)]
        else:
            groups = [by_length[j:j + self.mbs] for j in range(0, self.gbs, self.mbs)]
        widths = [self._width(g) for g in groups]
        if self.uniform_length:
            widths = [max(widths)] * len(widths)
        rows = [len(plan_rows([self.lengths[i] for i in g], w)) if self.pack and not self.uniform_length else len(g)
                for g, w in zip(groups, widths)]
        real = sum(self.lengths[i] for i in indices)
        total = sum(w * n for n, w in zip(rows, widths))
        self.real_tokens += real
        self.batch_tokens += total
        self.last_step_waste = 1.0 - real / total
        if self.pack:
            per_rank_groups = len(groups) // self.dp_size
            mine = list(zip(groups, widths))[self.dp_rank * per_rank_groups:(self.dp_rank + 1) * per_rank_groups]
            return [pack_documents([self.samples[i] for i in g], seq_length=w, pad_id=self.pad_id,
                                   num_rows=len(g) if self.uniform_length else None) for g, w in mine]
        mine = list(zip(groups, widths))[self.dp_rank::self.dp_size]
        return [collate_padded([self.samples[i] for i in g], seq_length=w, pad_id=self.pad_id) for g, w in mine]

    @property
    def padding_waste(self) -> float:
        """Fraction of all batch positions so far that were padding."""
        return 1.0 - self.real_tokens / self.batch_tokens if self.batch_tokens else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "real_tokens": self.real_tokens, "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.real_tokens, self.batch_tokens = int(state["real_tokens"]), int(state["batch_tokens"])


def pad_multiple_for(run, pad_multiple: int) -> int:
    """Sequence lengths must split evenly under sequence parallelism (TP) and context parallelism (2·CP);
    under FP8 with sequence parallelism each rank's slice must itself hold a multiple of 8 rows (TE runs
    the GEMM on the local slice before its all-gather)."""
    p = run.parallel
    multiple = pad_multiple
    if p.sequence_parallel:
        multiple = math.lcm(multiple, p.tensor_parallel)
        if run.precision.fp8 is not None:
            multiple = math.lcm(multiple, 8 * p.tensor_parallel)
    if p.context_parallel > 1:
        multiple = math.lcm(multiple, 2 * p.context_parallel)
    return multiple
