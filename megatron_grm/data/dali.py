"""Optional NVIDIA DALI path: read and pad documents in a DALI pipeline, same batches as PyTorch.

NGC images ship DALI; elsewhere it is absent and the PyTorch batchers run. Which documents form a
batch is still decided by :class:`~megatron_grm.data.packing.PaddedBatcher` (sampler, bucketing,
resume state), so both paths produce identical batches; DALI does the per-sample reading from the
memory-mapped shards and the padding on its worker threads (and on the GPU with ``device_id``).
:func:`make_padded_loader` picks the path and logs which one runs.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megatron_grm.data.packing import PaddedBatcher, _assemble

log = logging.getLogger(__name__)


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


class DaliPaddedLoader:
    """Iterates the batches of ``batcher`` with reading and padding done by a DALI pipeline."""

    def __init__(self, batcher: PaddedBatcher, num_threads: int = 2, device_id: int | None = None) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.batcher = batcher
        pad_shape = None if batcher.seq_length is None else (batcher.seq_length,)

        @pipeline_def
        def padding_pipeline():  # type: ignore[no-untyped-def]
            tokens, mask, lengths = fn.external_source(
                source=self._read_batch, num_outputs=3, batch=True,
                dtype=[types.INT64, types.UINT8, types.INT64])
            if device_id is not None:
                tokens, mask = tokens.gpu(), mask.gpu()
            pad = {"axes": (0,)} if pad_shape is None else {"axes": (0,), "shape": pad_shape}
            return (fn.pad(tokens, fill_value=batcher.pad_id, **pad), fn.pad(mask, fill_value=0, **pad),
                    lengths)

        # Synchronous, unpipelined execution: the source is called exactly once per run(), so the
        # batcher's resume state always matches the batches handed out.
        self.pipe = padding_pipeline(batch_size=batcher.micro_batch_size, num_threads=num_threads,
                                     device_id=device_id, exec_async=False, exec_pipelined=False,
                                     prefetch_queue_depth=1)
        self.pipe.build()

    def _read_batch(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        docs = self.batcher.documents(self.batcher.next_indices())
        return ([d[0] for d in docs], [np.asarray(d[1], dtype=np.uint8) for d in docs],
                [np.array([d[0].size], dtype=np.int64) for d in docs])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens, mask, lengths = (_to_numpy(out) for out in self.pipe.run())
        rows = [[(tokens[i, :n], mask[i, :n])] for i, n in enumerate(lengths[:, 0])]
        batch, n_pad = _assemble(rows, tokens.shape[1], self.batcher.pad_id)
        self.batcher._count(rows, tokens.shape[1], n_pad)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)

    @property
    def padding_waste(self) -> float:
        return self.batcher.padding_waste


def _to_numpy(tensor_list: Any) -> np.ndarray:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return np.asarray(tensor_list.as_array())


def make_padded_loader(batcher: PaddedBatcher, use_dali: bool | None = None, num_threads: int = 2,
                       device_id: int | None = None) -> PaddedBatcher | DaliPaddedLoader:
    """DALI when asked for (or, with ``use_dali=None``, when installed), else the PyTorch batcher.
    Asking for DALI without it installed is an error, not a silent fallback."""
    available = dali_available()
    if use_dali and not available:
        raise RuntimeError("use_dali=True but nvidia.dali is not importable "
                           "(pip install nvidia-dali-cuda120)")
    if use_dali or (use_dali is None and available):
        log.info("data path: DALI pipeline (%s)", "cpu" if device_id is None else f"gpu {device_id}")
        return DaliPaddedLoader(batcher, num_threads=num_threads, device_id=device_id)
    log.info("data path: PyTorch batcher (%s)",
             "nvidia.dali not installed" if not available else "DALI disabled by configuration")
    return batcher
