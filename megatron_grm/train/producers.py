"""Batch producers: turn samples into this DP rank's micro-batches for a given step, resumably.

The global batch for step ``s`` is a pure function of (seed, epoch order, consumed samples), so every
TP/PP rank builds the same batch and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

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
