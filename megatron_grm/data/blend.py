"""Deterministic weighted blend of several datasets (e.g. kept judgments + general instruction data).

RFT mixes its kept judgments with general instruction data; the mix must be the same on every rank and
every restart, so the blend is an index built once, not random draws. Megatron-Core's compiled
``build_blending_indices`` (it runs on CPU) assigns each blended position to the dataset whose share
is furthest behind its weight, so any prefix of the blend follows the weights to within one sample.
Datasets smaller than their share are cycled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from megatron.core.datasets import helpers_cpp


class BlendedDataset:
    """``ds[i]`` is ``datasets[dataset_index[i]][sample_index[i] % len(that dataset)]``."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int | None = None) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and "
                             f"{len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        for i, ds in enumerate(datasets):
            if len(ds) == 0 and w[i] > 0:
                raise ValueError(f"dataset {i} is empty but has weight {w[i]}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size if size is not None else sum(len(d) for d in datasets))
        self.dataset_index = np.zeros(self.size, dtype=np.int16)
        self.sample_index = np.zeros(self.size, dtype=np.int64)
        helpers_cpp.build_blending_indices(self.dataset_index, self.sample_index, self.weights,
                                           len(self.datasets), self.size, False)
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        ds = self.datasets[self.dataset_index[index]]
        return ds[int(self.sample_index[index] % len(ds))]

    def counts(self) -> np.ndarray:
        """How many blended samples come from each dataset."""
        return np.bincount(self.dataset_index, minlength=len(self.datasets))

    @property
    def sequence_lengths(self) -> np.ndarray | None:
        """Per-sample lengths when every member dataset exposes them (used for length bucketing)."""
        if self._lengths is None:
            member = [getattr(d, "sequence_lengths", None) for d in self.datasets]
            if any(m is None for m in member):
                return None
            lengths = np.zeros(self.size, dtype=np.int64)
            for d, m in enumerate(member):
                sel = self.dataset_index == d
                lengths[sel] = np.asarray(m)[self.sample_index[sel] % len(m)]
            self._lengths = lengths
        return self._lengths
