"""Deterministic, resumable sample order across data-parallel ranks.

The global order is one seeded permutation per epoch, epochs laid end to end. Data-parallel rank r of
R takes every R-th position of that stream starting at r, so ranks never share a position and the
order depends only on (seed, number of samples) — not on how often a job was restarted. The state is
the rank's position in its share; restoring it continues the stream exactly.

``consumed_samples`` follows Megatron's meaning (samples consumed by all ranks together): a sampler
built with it, or restored under a different DP size, starts rank r at global position
``consumed_samples + r``. That is exact when ranks consume in lockstep (padded batches); with packing,
ranks consume at different rates, so each rank saves and restores its own state.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ResumableSampler:
    """Infinite (or ``num_epochs``-long) iterator of dataset indices for one data-parallel rank."""

    def __init__(self, num_samples: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, consumed_samples: int = 0, num_epochs: int | None = None) -> None:
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self.num_samples, self.dp_rank, self.dp_size = num_samples, dp_rank, dp_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.position = self._position_from_consumed(consumed_samples)
        self._epoch_cached = -1
        self._order = np.arange(0)

    def _position_from_consumed(self, consumed_samples: int) -> int:
        if consumed_samples < 0 or consumed_samples % self.dp_size:
            raise ValueError(f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                             f"dp_size={self.dp_size}")
        return consumed_samples // self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global index order of one epoch."""
        if epoch != self._epoch_cached:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._epoch_cached = epoch
        return self._order

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed if all ranks are at this rank's position (Megatron's counter)."""
        return self.position * self.dp_size

    @property
    def epoch(self) -> int:
        return (self.position * self.dp_size + self.dp_rank) // self.num_samples

    def __iter__(self) -> ResumableSampler:
        return self

    def __next__(self) -> int:
        epoch, offset = divmod(self.position * self.dp_size + self.dp_rank, self.num_samples)
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration
        index = int(self.epoch_order(epoch)[offset])
        self.position += 1
        return index

    def state_dict(self, rewind: int = 0) -> dict[str, Any]:
        """State to checkpoint; ``rewind`` un-consumes samples a batcher drew but did not emit yet."""
        if not 0 <= rewind <= self.position:
            raise ValueError(f"rewind={rewind} outside [0, position={self.position}]")
        position = self.position - rewind
        return {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "position": position,
                "consumed_samples": position * self.dp_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state field '{key}' is {state[key]!r}, this sampler has "
                                 f"{getattr(self, key)!r}: the sample order would differ")
        if (state["dp_rank"], state["dp_size"]) == (self.dp_rank, self.dp_size):
            self.position = state["position"]
        else:
            self.position = self._position_from_consumed(state["consumed_samples"])
