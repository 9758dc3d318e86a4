"""Documents → the trainer's batch dict, by sequence packing or by (length-bucketed) padding.

A *document* is ``(token ids, response mask)`` as stored by preprocessing: the mask is aligned with
the ids and is 1 on response tokens. The batch contract the trainer consumes (dict of tensors):

=================  ==============  ===========================================================
``tokens``         int64 [b, s]    input ids; padding is ``pad_id``
``labels``         int64 [b, s]    ``tokens`` shifted left by one; the last column is ``pad_id``
``loss_mask``      float32 [b, s]  1.0 where ``labels[:, t]`` is a response token of the same
                                   document as position t; 0 on prompts, padding and at every
                                   document end (the next token belongs to another document)
``position_ids``   int64 [b, s]    restart at 0 at each packed document; 0 on padding
``attention_mask`` bool [b,1,s,s]  Megatron's convention, True = masked out: causal and
                                   block-diagonal per document; no real token sees padding,
                                   and a padding query sees only itself (so no softmax row is
                                   fully masked, which gives NaN with -inf masking)
=================  ==============  ===========================================================

Packing puts whole documents into rows in the order they come (next-fit), so the order — and with a
resumable sampler, the whole stream — is deterministic. The batchers count padding so the waste of a
configuration is visible (``padding_waste``). With ``truncate=True`` a document longer than
``seq_length`` is cut rather than refused; that loses its tail (often the response and its EOS), so every
cut is logged and the batchers count cut documents in ``stats["truncated"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

Document = tuple[Any, Any]  # (token ids, response mask), array-likes of equal length


class IndexSampler(Protocol):
    """What batchers need from a sampler (see :class:`megatron_grm.data.sampler.ResumableSampler`)."""

    def __next__(self) -> int: ...

    def state_dict(self, rewind: int = 0) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _as_document(doc: Document, index: Any, seq_length: int | None, truncate: bool,
                 truncated: list[tuple[Any, int]] | None = None) -> tuple[np.ndarray, ...]:
    """Validated (ids, mask) arrays; a document cut to ``seq_length`` is recorded in ``truncated`` as
    (index, original length) so callers can report it."""
    ids = np.asarray(doc[0], dtype=np.int64).reshape(-1)
    mask = np.asarray(doc[1]).reshape(-1)
    if ids.shape != mask.shape:
        raise ValueError(f"document {index}: {ids.size} tokens but {mask.size} loss-mask entries")
    if ids.size == 0:
        raise ValueError(f"document {index}: empty")
    if seq_length is not None and ids.size > seq_length:
        if not truncate:
            raise ValueError(f"document {index}: {ids.size} tokens exceed seq_length={seq_length} "
                             "(preprocess with max_tokens, raise seq_length or pass truncate=True)")
        if truncated is not None:
            truncated.append((index, int(ids.size)))
        ids, mask = ids[:seq_length], mask[:seq_length]
    return ids, mask


def _warn_truncated(truncated: Sequence[tuple[Any, int]], seq_length: int | None, where: str) -> None:
    if truncated:
        index, length = truncated[0]
        log.warning("%s: truncated %d document(s) to seq_length=%s (first: document %s, %d tokens); their "
                    "tails, often the response's end and EOS, are not trained on", where, len(truncated),
                    seq_length, index, length)


def plan_rows(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Next-fit packing: consecutive documents share a row while they fit; returns indices per row."""
    rows: list[list[int]] = []
    used = seq_length
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ValueError(f"document {i}: {n} tokens exceed seq_length={seq_length}")
        if used + n > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _assemble(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_length: int,
              pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Build the contract dict from rows of (already validated) documents; also returns the pad count."""
    b, s = len(rows), seq_length
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    position_ids = np.zeros((b, s), dtype=np.int64)
    segment = -1 - np.tile(np.arange(s, dtype=np.int64), (b, 1))  # unique negative ids for padding
    n_pad = 0
    for r, row in enumerate(rows):
        pos = 0
        for k, (ids, mask) in enumerate(row):
            n = ids.size
            if pos + n > s:
                raise ValueError(f"row {r}: documents total more than seq_length={s} tokens")
            tokens[r, pos:pos + n] = ids
            loss_mask[r, pos:pos + n - 1] = mask[1:] != 0
            position_ids[r, pos:pos + n] = np.arange(n)
            segment[r, pos:pos + n] = k
            pos += n
        n_pad += s - pos
    labels = np.full((b, s), pad_id, dtype=np.int64)
    labels[:, :-1] = tokens[:, 1:]
    seg = torch.from_numpy(segment)
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    batch = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "attention_mask": (~allowed).unsqueeze(1),
    }
    return batch, n_pad


def collate_padded(items: Sequence[Document], seq_length: int | None = None, pad_id: int = 0,
                   truncate: bool = False) -> dict[str, torch.Tensor]:
    """One document per row, right-padded to ``seq_length`` (default: the longest item)."""
    if not items:
        raise ValueError("collate_padded: no documents")
    truncated: list[tuple[Any, int]] = []
    docs = [_as_document(item, i, seq_length, truncate, truncated) for i, item in enumerate(items)]
    _warn_truncated(truncated, seq_length, "collate_padded")
    length = seq_length if seq_length is not None else max(d[0].size for d in docs)
    return _assemble([[d] for d in docs], length, pad_id)[0]


def pack_documents(documents: Sequence[Document], seq_length: int, pad_id: int = 0,
                   num_rows: int | None = None, truncate: bool = False) -> dict[str, torch.Tensor]:
    """Pack documents in order into rows of ``seq_length`` (next-fit); ``num_rows`` fixes the batch size
    (all-padding rows fill up; too many documents is an error)."""
    truncated: list[tuple[Any, int]] = []
    docs = [_as_document(d, i, seq_length, truncate, truncated) for i, d in enumerate(documents)]
    _warn_truncated(truncated, seq_length, "pack_documents")
    rows = [[docs[i] for i in row] for row in plan_rows([d[0].size for d in docs], seq_length)]
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"pack_documents: documents need {len(rows)} rows, num_rows={num_rows}")
        rows += [[] for _ in range(num_rows - len(rows))]
    return _assemble(rows, seq_length, pad_id)[0]


class _Batcher:
    """Shared bookkeeping: padding statistics that survive checkpoint/resume."""

    def __init__(self, dataset: Any, sampler: IndexSampler, micro_batch_size: int, pad_id: int) -> None:
        if micro_batch_size <= 0:
            raise ValueError("micro_batch_size must be positive")
        self.dataset, self.sampler = dataset, sampler
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.stats = {"batches": 0, "documents": 0, "tokens": 0, "pad_tokens": 0, "truncated": 0}

    def _note_truncated(self, index: Any, length: int, seq_length: int | None) -> None:
        """Count a document cut to ``seq_length`` in an emitted batch, and log it: the first cut, then
        whenever the count doubles, so a long run's log stays readable."""
        self.stats["truncated"] = count = self.stats.get("truncated", 0) + 1
        if count & (count - 1) == 0:
            log.warning("%s: truncated document %s (%d tokens) to seq_length=%s; %d document(s) truncated "
                        "so far (stats['truncated'])", type(self).__name__, index, length, seq_length, count)

    @property
    def padding_waste(self) -> float:
        """Fraction of batch positions that were padding, over all batches so far."""
        total = self.stats["tokens"] + self.stats["pad_tokens"]
        return self.stats["pad_tokens"] / total if total else 0.0

    def _count(self, rows: Sequence[Sequence[Any]], seq_length: int, n_pad: int) -> None:
        self.stats["batches"] += 1
        self.stats["documents"] += sum(len(r) for r in rows)
        self.stats["pad_tokens"] += n_pad
        self.stats["tokens"] += len(rows) * seq_length - n_pad

    def _lengths(self, indices: Sequence[int]) -> np.ndarray:
        lengths = getattr(self.dataset, "sequence_lengths", None)
        if lengths is not None:
            return np.asarray(lengths)[np.asarray(indices, dtype=np.int64)]
        return np.array([len(self.dataset[i][0]) for i in indices])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self


class PackedBatcher(_Batcher):
    """``micro_batch_size`` rows of ``seq_length`` tokens, each filled with whole documents in sampler
    order. State is the sampler position of the first document not yet in an emitted batch."""

    def __init__(self, dataset: Any, sampler: IndexSampler, micro_batch_size: int, seq_length: int,
                 pad_id: int = 0, truncate: bool = False) -> None:
        super().__init__(dataset, sampler, micro_batch_size, pad_id)
        self.seq_length, self.truncate = seq_length, truncate
        self._pending: tuple[np.ndarray, np.ndarray] | None = None
        self._pending_cut: list[tuple[Any, int]] = []  # (index, length) if the pending document was cut
        self._exhausted = False

    def _next_document(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._pending is None and not self._exhausted:
            try:
                index = next(self.sampler)
            except StopIteration:
                self._exhausted = True
                return None
            self._pending_cut = []
            self._pending = _as_document(self.dataset[index], index, self.seq_length, self.truncate,
                                         self._pending_cut)
        return self._pending

    def __next__(self) -> dict[str, torch.Tensor]:
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        used = 0
        while (doc := self._next_document()) is not None:
            if used + doc[0].size > self.seq_length:
                if len(rows) == self.micro_batch_size:
                    break
                rows.append([])
                used = 0
            rows[-1].append(doc)
            used += doc[0].size
            for index, length in self._pending_cut:  # counted once it is in a batch (exact on resume)
                self._note_truncated(index, length, self.seq_length)
            self._pending = None
        if not rows[0]:
            raise StopIteration
        rows += [[] for _ in range(self.micro_batch_size - len(rows))]
        batch, n_pad = _assemble(rows, self.seq_length, self.pad_id)
        self._count(rows, self.seq_length, n_pad)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(rewind=int(self._pending is not None)),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _require_same_data_parallel_layout(state["sampler"], self.sampler, "packed rows")
        self.sampler.load_state_dict(state["sampler"])
        self.stats = {"truncated": 0, **state["stats"]}  # checkpoints from before the count have none
        self._pending, self._exhausted = None, False


def _require_same_data_parallel_layout(saved: dict[str, Any], sampler: Any, what: str) -> None:
    """Ranks draw at their own pace (packing) or stopped inside a window of batches: the saved position is
    exact only for the rank that wrote it. Another DP layout would repeat and skip documents: refuse."""
    here = (getattr(sampler, "dp_rank", 0), getattr(sampler, "dp_size", 1))
    if (saved.get("dp_rank", 0), saved.get("dp_size", 1)) != here:
        raise ValueError(f"cannot resume {what} written by data-parallel rank {saved.get('dp_rank')} of "
                         f"{saved.get('dp_size')} on rank {here[0]} of {here[1]}: resume with the same data-parallel "
                         "size")


class PaddedBatcher(_Batcher):
    """One document per row. With ``bucket_size`` > 1, that many micro-batches' worth of documents are
    drawn together and sorted by length before being cut into batches (less padding, same documents);
    the batches of a window are emitted in a seeded shuffled order so lengths do not cycle."""

    def __init__(self, dataset: Any, sampler: IndexSampler, micro_batch_size: int,
                 seq_length: int | None = None, pad_id: int = 0, bucket_size: int = 1,
                 truncate: bool = False) -> None:
        super().__init__(dataset, sampler, micro_batch_size, pad_id)
        if bucket_size <= 0:
            raise ValueError("bucket_size must be positive")
        self.seq_length, self.bucket_size, self.truncate = seq_length, bucket_size, truncate
        self._window_state = self.sampler.state_dict()
        self._window = 0
        self._batches: list[list[int]] = []
        self._emitted = 0

    def _fill_window(self) -> None:
        self._window_state = self.sampler.state_dict()
        indices: list[int] = []
        for _ in range(self.micro_batch_size * self.bucket_size):
            try:
                indices.append(next(self.sampler))
            except StopIteration:
                break
        if self.bucket_size > 1:
            indices = [indices[i] for i in np.argsort(self._lengths(indices), kind="stable")]
        size = self.micro_batch_size
        batches = [indices[i:i + size] for i in range(0, len(indices), size)]
        if self.bucket_size > 1:
            batches = [batches[i] for i in np.random.default_rng(self._window).permutation(len(batches))]
        self._batches = batches
        self._emitted = 0

    def next_indices(self) -> list[int]:
        """Dataset indices of the next batch (used by the DALI path to read the same documents)."""
        if self._emitted == len(self._batches):
            if self._batches:
                self._window += 1
            self._fill_window()
            if not self._batches:
                raise StopIteration
        self._emitted += 1
        return self._batches[self._emitted - 1]

    def documents(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Validated documents of one batch about to be emitted (cut ones are counted and logged)."""
        cut: list[tuple[Any, int]] = []
        docs = [_as_document(self.dataset[i], i, self.seq_length, self.truncate, cut) for i in indices]
        for index, length in cut:
            self._note_truncated(index, length, self.seq_length)
        return docs

    def __next__(self) -> dict[str, torch.Tensor]:
        docs = self.documents(self.next_indices())
        length = self.seq_length if self.seq_length is not None else max(d[0].size for d in docs)
        rows = [[d] for d in docs]
        batch, n_pad = _assemble(rows, length, self.pad_id)
        self._count(rows, length, n_pad)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self._window_state, "window": self._window, "emitted": self._emitted,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["emitted"]:  # mid-window: the same window must be refilled, on the same rank
            _require_same_data_parallel_layout(state["sampler"], self.sampler, "a length-sorted window")
        self.sampler.load_state_dict(state["sampler"])
        self._window = state["window"]
        self._fill_window()
        self._emitted = state["emitted"]
        self.stats = {"truncated": 0, **state["stats"]}  # checkpoints from before the count have none
