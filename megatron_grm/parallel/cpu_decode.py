"""CPU kernels for Megatron-Core's flash-decode path, so static-batch rollouts on the CPU cost O(1) per token.

Without ``config.flash_decode`` Megatron-Core 0.16.1's static batching keeps *un-rotated* keys in its KV
cache and re-applies RoPE to the whole cache — recomputing cos/sin for every position — in every layer at
every decoding step (attention.py ``_adjust_key_value_for_inference`` then ``apply_rotary_pos_emb`` on
``k_pos_emb[:sequence_end]``). Profiling the tiny GRM's rollouts put 42% of the time there. Its
flash-decode path instead rotates each key once before caching it and attends with one fused call, but
needs flash-attn's ``flash_attn_with_kvcache`` and ``apply_rotary_emb``. This module gives those two
functions CPU implementations with flash-attn's contracts and installs them into Megatron's modules
where flash-attn is absent; the model's generation loop, cache and sampling stay Megatron's.

Only for models whose attention flash-decode handles exactly: Megatron's own ``SelfAttention`` with RoPE
(no MLA, no sliding window, no custom softmax scale, no soft-capping). :func:`enable_cpu_flash_decode`
checks that and otherwise leaves the model alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_grm.parallel import cpu_decode_kernel, huge_pages

log = logging.getLogger(__name__)

# [rows, cache positions] bool, True = a padding position no query may attend to (left-padded prompts,
# see megatron_grm.rollout.alignment). Megatron's flash-decode call carries no mask, so the static
# backend sets it here for the duration of a wave.
_key_padding: torch.Tensor | None = None
_key_padding_additive: torch.Tensor | None = None  # the same as 0 / -inf, float32, for the decode path
_leading_padding: torch.Tensor | None = None  # [rows] int64: how many positions each row's padding starts with
# Which rows hold the same keys/values in which prompt positions (an example's samples, prefilled once
# where they agree by megatron_grm.rollout.shared_prefill); None outside shared_prompts.
_shared_prompts: _SharedPrompts | None = None
# Per layer (keyed by its cache's address), a head-major copy of the KV cache for the decode steps of one
# wave; None outside contiguous_decode_cache.
_head_major: dict[int, _HeadMajorCache] | None = None
# [rows] int64: how many positions earlier than its cache position each row's RoPE angle is (rows prefilled
# in a group of their own, from that group's first position: megatron_grm.rollout.alignment.length_groups);
# None outside rotary_shifted_by.
_rotary_shift: torch.Tensor | None = None
_step_angle_cache: tuple | None = None  # ((offset, dtype), cos table, sin table, cos rows, sin rows): last step's


@contextlib.contextmanager
def masked_cache_positions(key_padding: torch.Tensor | None) -> Iterator[None]:
    """Hide these KV-cache positions from every decode query while the block runs."""
    global _key_padding, _key_padding_additive, _leading_padding
    previous = _key_padding, _key_padding_additive, _leading_padding
    _key_padding = key_padding
    _key_padding_additive = None if key_padding is None else torch.zeros(
        key_padding.shape, dtype=torch.float32, device=key_padding.device).masked_fill_(key_padding, float("-inf"))
    # The C++ kernel starts each row after its left padding instead of reading it (~10% of a wave's cache
    # with 960-1,200-token prompts).
    _leading_padding = None if key_padding is None else key_padding.long().cumprod(dim=1).sum(dim=1)
    try:
        yield
    finally:
        _key_padding, _key_padding_additive, _leading_padding = previous


@contextlib.contextmanager
def rotary_shifted_by(shift: torch.Tensor | None) -> Iterator[None]:
    """While the block runs, rotate row ``r``'s queries and new keys at its cache position minus
    ``shift[r]``: the frame its prefill group's keys were rotated in. RoPE scores depend only on the
    distance between positions, so a row's attention is the same (up to rounding) in any frame, as long as
    all its keys and queries share one."""
    global _rotary_shift, _step_angle_cache
    previous = _rotary_shift
    _rotary_shift, _step_angle_cache = None if shift is None else shift.long(), None
    try:
        yield
    finally:
        _rotary_shift, _step_angle_cache = previous, None


def _step_angles(cos: torch.Tensor, sin: torch.Tensor, start: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's angles at cache offset ``start``: taken once per step and tables (every layer of the
    step passes the same ``cos``/``sin`` tensors), ~20 us a layer otherwise; inside rotary_shifted_by the
    rows' angles differ (a gather)."""
    global _step_angle_cache
    cached = _step_angle_cache
    if cached is not None and cached[0] == (start, dtype) and cached[1] is cos and cached[2] is sin:
        return cached[3], cached[4]
    c, si = _angles(cos, sin, 1, start if _rotary_shift is None else _rotary_positions(start), dtype, device)
    _step_angle_cache = ((start, dtype), cos, sin, c, si)  # holds the tables: their identity stays theirs
    return c, si


def _rotary_positions(offset: int | torch.Tensor) -> int | torch.Tensor:
    """The RoPE offset for cache offset(s) ``offset``, minus each row's shift inside rotary_shifted_by."""
    if _rotary_shift is None:
        return offset
    return torch.as_tensor(offset).to(_rotary_shift.device) - _rotary_shift


@dataclass
class _SharedSegment:
    """Prompt positions ``[start, end)`` read once per group of rows: the groups laid out as ``groups x
    slots`` (a group's rows, padded to the largest group by repeating its first row), and each layer's
    keys/values there once per group."""

    start: int
    end: int
    first: torch.Tensor  # [groups] a row of each group
    slot_rows: torch.Tensor  # [groups * slots] the row in each slot
    row_slots: torch.Tensor  # [rows] the slot of each row
    slots: int
    per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _SharedPrompts:
    """The wave's prompt width, and the segments from position 0 read once per group; the positions
    after the last of them are read per row."""

    width: int
    segments: list[_SharedSegment]


def head_major_kv(positions: int, rows: int, heads: int, dim: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu", zeros: bool = False) -> torch.Tensor:
    """A static KV cache tensor as Megatron indexes it, ``[positions, rows, heads, dim]``, whose memory is
    laid out ``[rows, heads, positions, dim]``: one row's keys for one head lie together, which is how a
    decode step reads them. Megatron only slices and assigns into its caches, so any strides serve it. On the
    CPU the memory comes from :mod:`huge_pages` (reused between waves, on huge pages where the kernel grants
    them)."""
    if torch.device(device).type == "cpu":
        return huge_pages.host_empty((rows, heads, positions, dim), dtype, zeros).permute(2, 0, 1, 3)
    make = torch.zeros if zeros else torch.empty
    return make(rows, heads, positions, dim, dtype=dtype, device=device).permute(2, 0, 1, 3)


def is_head_major(cache: torch.Tensor) -> bool:
    """Whether a ``[positions, rows, heads, dim]`` cache tensor is laid out as :func:`head_major_kv` lays it."""
    return cache.dim() == 4 and cache.permute(1, 2, 0, 3).is_contiguous()


def kv_cache_like(cache: torch.Tensor, positions: int, rows: int) -> torch.Tensor:
    """A zeroed cache tensor of ``positions`` x ``rows`` with ``cache``'s heads, dtype, device and layout."""
    if is_head_major(cache):
        return head_major_kv(positions, rows, cache.shape[2], cache.shape[3], cache.dtype, cache.device, zeros=True)
    return cache.new_zeros((positions, rows, *cache.shape[2:]))


def kv_cache_rows(cache: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A cache tensor whose row ``r`` is ``cache``'s row ``source[r]``, in ``cache``'s layout."""
    if is_head_major(cache):
        return cache.permute(1, 2, 0, 3).index_select(0, source.to(cache.device)).permute(2, 0, 1, 3)
    return cache.index_select(1, source.to(cache.device))


@dataclass
class _HeadMajorCache:
    keys: torch.Tensor  # [rows, KV heads, positions, dim]
    values: torch.Tensor
    length: int  # positions written


@contextlib.contextmanager
def contiguous_decode_cache() -> Iterator[None]:
    """While the block runs (one wave), decode steps read each layer's KV cache as ``[rows, KV heads,
    positions, dim]``, every (row, head)'s positions contiguous.

    Megatron's cache is ``[positions, rows, heads, dim]``: one row's keys for one head lie 32 KB apart at
    batch 32, and a decode step at GRM prompt lengths is mostly this read (one step's attention, 32 rows
    of 1,200 positions, 4 KV heads of 64: scores 4.0-4.5 ms strided vs 1.6-1.8 ms contiguous, session 6).
    So the static caches Megatron allocates on the CPU inside the block (``Attention._allocate_memory``)
    are laid out head-major (:func:`head_major_kv`) and decode steps read them in place. A cache laid out
    otherwise (allocated outside the block) is copied head-major at a layer's first decode step, and both
    copies are written every step, so Megatron's stays complete (twice the wave's KV memory). Laid out
    head-major from the start, bench/rollout.py's wave (32 rows of ~1,200 positions) skips that copy,
    ~25-30 ms at its first decode step, and two of the four cache writes of every layer's step, ~40 µs
    (session 43).
    """
    global _head_major
    from megatron.core.transformer.attention import Attention

    previous = _head_major
    _head_major = {}
    allocate = Attention.__dict__["_allocate_memory"]

    def allocate_head_major(self, positions, rows, dim, dtype):
        if torch.cuda.is_available():  # GPU caches go to flash-attn, which has its own layout rules
            return allocate(self, positions, rows, dim, dtype)
        return head_major_kv(positions, rows, self.num_query_groups_per_partition, dim, dtype)

    Attention._allocate_memory = allocate_head_major
    try:
        yield
    finally:
        Attention._allocate_memory = allocate
        _head_major = previous


def _cache_views(layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, k: torch.Tensor | None,
                 v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the step's key/value at ``start`` and return the cache as ``[rows, heads, positions, dim]``:
    Megatron's own where it is laid out head-major, else (inside :func:`contiguous_decode_cache`) the
    head-major copy of ``layer``, else a strided view of Megatron's."""
    if k is not None:
        k_cache[:, start:start + 1] = k.to(k_cache.dtype)
        v_cache[:, start:start + 1] = v.to(v_cache.dtype)
    keys, values = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if _head_major is None or (keys.is_contiguous() and values.is_contiguous()):
        return keys, values
    entry = _head_major.get(layer)
    if entry is None or entry.length != start:  # first step of the layer (or a step it did not see): copy
        entry = _HeadMajorCache(keys.contiguous(), values.contiguous(), start)
        _head_major[layer] = entry
    elif k is not None:
        entry.keys[:, :, start] = k[:, 0].to(k_cache.dtype)
        entry.values[:, :, start] = v[:, 0].to(v_cache.dtype)
    if k is not None:
        entry.length = start + 1
    return entry.keys, entry.values


# Below this many shared positions the per-row read is cheaper than the shared path's extra gathers: one
# decode step's attention, 32 rows, 4 KV heads of 64, 4 prompts x 8 copies (session 6, 2-core CPU): 48
# positions 0.35 vs 0.55 ms, 256: 0.97 vs 1.01 ms, 1,100: 8.0 vs 1.8 ms (16 prompts x 2 copies: 3.5 ms).
SHARED_PROMPT_MIN_WIDTH = 256


@contextlib.contextmanager
def shared_prompts(segments: Sequence[Any] | None, width: int,
                   min_width: int = SHARED_PROMPT_MIN_WIDTH) -> Iterator[None]:
    """Declare that in each segment's positions ``[start, end)`` row ``r`` holds the same keys and values
    as row ``first[source[r]]`` (``megatron_grm.rollout.shared_prefill.PrefixSegment``s, in order from 0, of
    a wave whose prompts are ``width`` positions). Decode steps then read a segment's keys and values
    once per group, one matmul with its rows' queries stacked, instead of once per row: at GRM prompt
    lengths the cache, not the weights, is most of what a decode step reads. Segments from the first
    that does not at least halve the rows, or whose groups stacked to the largest would take more than
    twice the rows' queries, are read per row (everything, when fewer than ``min_width`` positions would
    be shared)."""
    global _shared_prompts
    previous = _shared_prompts
    leading = []
    for segment in segments or ():
        rows, groups = len(segment.source), len(segment.first)
        largest = int(torch.bincount(segment.source, minlength=groups).max())
        if 2 * groups > rows or groups * largest > 2 * rows:  # too little shared, or stacked too unevenly
            break
        leading.append(segment)
    _shared_prompts = None
    if leading and leading[-1].end >= min_width:
        _shared_prompts = _SharedPrompts(width, [_slot_layout(seg.start, seg.end, seg.first, seg.source)
                                                 for seg in leading])
    try:
        yield
    finally:
        _shared_prompts = previous


def _slot_layout(start: int, end: int, first: torch.Tensor, source: torch.Tensor) -> _SharedSegment:
    counts = torch.bincount(source, minlength=len(first))
    slots = int(counts.max())
    slot_rows = first.repeat_interleave(slots)  # padding slots read the group's first row (output dropped)
    row_slots = torch.empty_like(source)
    for group in range(len(first)):
        rows = torch.nonzero(source == group).flatten()
        positions = group * slots + torch.arange(len(rows))
        slot_rows[positions] = rows
        row_slots[rows] = positions
    return _SharedSegment(start, end, first, slot_rows, row_slots, slots)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     seqlen_offsets: int | torch.Tensor = 0) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb``: ``x`` ``[b, s, h, d]``, ``cos``/``sin`` ``[s_ro, d_rot / 2]``;
    rotates the first ``d_rot`` channels of position ``t`` by angle row ``t + seqlen_offsets``."""
    c, si = _angles(cos, sin, x.shape[1], seqlen_offsets, x.dtype, x.device)
    return _rotate(x, c, si, interleaved)


def _angles(cos: torch.Tensor, sin: torch.Tensor, s: int, seqlen_offsets: int | torch.Tensor, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` rows for positions ``t + seqlen_offsets``, ``t < s``: ``[1 or b, s, 1, d_rot / 2]``."""
    start = _as_int(seqlen_offsets)
    if start is not None:  # one offset for every row: a slice, no gather
        return cos[start:start + s][None, :, None].to(dtype), sin[start:start + s][None, :, None].to(dtype)
    positions = torch.arange(s, device=device)[None, :] + seqlen_offsets.to(device).view(-1, 1)
    return cos[positions].unsqueeze(2).to(dtype), sin[positions].unsqueeze(2).to(dtype)


def _rotate(x: torch.Tensor, c: torch.Tensor, si: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The first ``2 * c.shape[-1]`` channels of ``x`` ``[b, s, h, d]`` rotated by the angles ``c``/``si``:
    in fp32 or bf16 one pass of the C++ kernel where it is built, the same products and roundings as the
    torch ops below."""
    if (x.dtype in cpu_decode_kernel.ELEMENTWISE_DTYPES and c.dtype is x.dtype and si.dtype is x.dtype
            and _native(x)):
        return cpu_decode_kernel.rotary(x, c, si, interleaved)
    return _rotate_with_torch(x, c, si, interleaved)


def _rotate_with_torch(x: torch.Tensor, c: torch.Tensor, si: torch.Tensor, interleaved: bool) -> torch.Tensor:
    half = c.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * si, x2 * c + x1 * si), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * si, x2 * c + x1 * si), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None, softmax_scale: float | None = None,
                            causal: bool = True, rotary_interleaved: bool = False, **unsupported) -> torch.Tensor:
    """flash-attn's ``flash_attn_with_kvcache`` for the flash-decode call Megatron makes.

    ``q`` ``[b, s_q, h_q, d]``, caches ``[b, s_max, h_kv, d]`` (written in place), new ``k``/``v``
    ``[b, s_q, h_kv, d]`` appended at ``cache_seqlens`` after rotating ``q`` and ``k`` there; then causal
    attention of each query over its row's cache, minus the positions :func:`masked_cache_positions`
    hides. Returns ``[b, s_q, h_q, d]``.
    """
    if unsupported:
        raise NotImplementedError(f"CPU flash_attn_with_kvcache: unsupported arguments {sorted(unsupported)}")
    start = _as_int(0 if cache_seqlens is None else cache_seqlens)
    if start is not None and q.shape[1] == 1 and causal:
        return _decode_one_position(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, start, softmax_scale,
                                    rotary_interleaved)
    b, s_q, h_q, d = q.shape
    lengths = torch.as_tensor(0 if cache_seqlens is None else cache_seqlens, device=q.device).long().expand(b)
    if rotary_cos is not None:
        angles = _rotary_positions(lengths)
        q = apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, angles)
        if k is not None:
            k = apply_rotary_emb(k, rotary_cos, rotary_sin, rotary_interleaved, angles)
    if k is not None:
        rows = torch.arange(b, device=q.device)[:, None]
        cols = lengths[:, None] + torch.arange(s_q, device=q.device)[None, :]
        k_cache[rows, cols] = k.to(k_cache.dtype)
        v_cache[rows, cols] = v.to(v_cache.dtype)
    total = lengths + (s_q if k is not None else 0)  # valid cache positions per row
    width = int(total.max())
    keys = k_cache[:, :width].transpose(1, 2)  # [b, h_kv, width, d]
    values = v_cache[:, :width].transpose(1, 2)
    # Query i of row r sits at position total[r] - s_q + i and sees the cache up to and including it.
    query_pos = (total - s_q)[:, None] + torch.arange(s_q, device=q.device)[None, :]  # [b, s_q]
    key_pos = torch.arange(width, device=q.device)
    limit = query_pos if causal else (total - 1)[:, None].expand(b, s_q)
    allowed = key_pos[None, None, :] <= limit[:, :, None]
    if _key_padding is not None:  # a padding query sees only itself (its output is never read)
        own = key_pos[None, None, :] == query_pos[:, :, None]
        allowed = allowed & (~_key_padding[:, None, :width].to(q.device) | own)
    # Grouped-query attention without copying the cache per query head (SDPA broadcasts the KV heads).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=allowed[:, None], scale=softmax_scale,
                                         enable_gqa=keys.shape[1] != h_q)
    return out.transpose(1, 2)


def _as_int(offsets: int | torch.Tensor) -> int | None:
    """The offset when it is one for all rows, else None. Megatron's static batching has one cache length
    for the whole batch but hands flash-decode a per-row tensor of it (``[rows]``, all equal). Read as one
    list (a comparison, a reduction and two host reads of torch ops were ~40 µs a layer inside a rollout's
    decode step)."""
    if isinstance(offsets, int):
        return offsets
    values = offsets.reshape(-1).tolist()
    first = values[0]
    return int(first) if all(value == first for value in values) else None


def _decode_one_position(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                         v: torch.Tensor | None, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                         start: int, softmax_scale: float | None, interleaved: bool) -> torch.Tensor:
    """The static loop's decode step: one query per row, every row's cache ``start`` long.

    The query heads of one KV group attend together over that group's cache (no copy of the cache per
    query head): in the C++ kernel where it is built (``parallel/cpu_decode_kernel.py``), else as rows of
    one matmul (fp32) or through torch's fused kernel (16-bit). The softmax runs in fp32, the only mask is
    the rows' padding.
    """
    b, _, h_q, d = q.shape
    if rotary_cos is not None:
        c, si = _step_angles(rotary_cos, rotary_sin, start, q.dtype, q.device)
        q = _rotate(q, c, si, interleaved)
        if k is not None:
            k = _rotate(k, c, si, interleaved)
    layer = k_cache.data_ptr()  # one cache per layer: its address names the layer for the per-wave copies
    k_cache, v_cache = _cache_views(layer, k_cache, v_cache, start, k, v)  # now [b, g, positions, d]
    if k is not None:
        start += 1
    groups = k_cache.shape[1]
    if _shared_prompts is not None and _shared_prompts.width <= start:
        return _decode_over_shared_prompts(q, k_cache, v_cache, start, softmax_scale, _shared_prompts, layer)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    queries = q.reshape(b, groups, h_q // groups, d)
    if _native(k_cache) or _fused(queries):  # the whole cache as one part: its output is the attention
        return _attend_per_row(queries, k_cache, v_cache, 0, start, scale)[2].to(q.dtype).reshape(b, 1, h_q, d)
    keys = k_cache[:, :, :start].transpose(2, 3).to(q.dtype)  # [b, g, d, width]
    values = v_cache[:, :, :start].to(q.dtype)  # [b, g, width, d]
    scores = torch.matmul(queries, keys).float().mul_(scale)  # [b, g, rep, width]
    if _key_padding_additive is not None:
        scores += _key_padding_additive[:, None, None, :start].to(scores.device)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(b, 1, h_q, d)


def _decode_over_shared_prompts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                                softmax_scale: float | None, shared: _SharedPrompts, layer: int) -> torch.Tensor:
    """:func:`_decode_one_position`'s attention (caches ``[b, g, positions, d]``, ``length`` positions
    filled) with each shared segment read once per group of rows (cascade / shared-prefix attention).

    Every part (a shared segment, then the rest of the positions per row) is reduced to each query's
    maximum score, sum of exponentials and normalised weighted values (in a non-fp32 dtype: the fused
    kernel's log-sum-exp and its output); the parts then merge as a split softmax does (log-sum-exp). The
    result is the per-row path's up to summation order (and, in 16-bit, each part's rounded output).
    """
    b, _, h_q, d = q.shape
    groups = k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    queries = q.reshape(b, groups, h_q // groups, d)
    parts = [_attend_shared_segment(queries, k_cache, v_cache, segment, layer, scale)
             for segment in shared.segments]
    start = shared.segments[-1].end
    if start < length:
        parts.append(_attend_per_row(queries, k_cache, v_cache, start, length, scale))
    return _merge_parts(parts).to(q.dtype).reshape(b, 1, h_q, d)


# Per query: max score, sum of exp, normalised output (a fused part: log-sum-exp, 1, output).
_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# torch's CPU flash-attention kernel (SDPA's), which also returns each query's log-sum-exp (what a part
# needs to be merged); the public SDPA does not return it. Used in non-fp32 dtypes, where a batched matmul
# of a few query rows against a transposed cache copies the cache per call: aten::copy_ was 46% of a
# profiled bf16 rollout, and one step's scores at 32 rows x 1,200 positions took 4.6 ms in bf16 against
# 0.85 ms in fp32, while the kernel reads the cache in place, keeps the softmax in fp32, and took 1.4 ms
# for scores, softmax and values together (session 26). fp32 keeps the matmul, which measured as fast.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _native(cache: torch.Tensor) -> bool:
    """Whether decode parts over this cache go through the C++ kernel (``parallel/cpu_decode_kernel.py``),
    which reads the cache at about the memory's rate where torch's kernels reach half of it or less."""
    return cache.device.type == "cpu" and cpu_decode_kernel.available(cache.dtype)


def _fused(queries: torch.Tensor) -> bool:
    return queries.dtype != torch.float32 and _FLASH_CPU is not None


def _fused_part(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> _Part:
    """One part in a non-fp32 dtype through the fused kernel: queries ``[B, H, L, d]``, keys/values
    ``[B, h_kv, n, d]``, ``H == h_kv`` (callers pass a KV group's query heads as its query positions; the
    private op does not check), additive ``mask`` ``[B, 1, 1, n]`` in the
    queries' dtype. The part is (log-sum-exp, 1, output rounded to the queries' dtype); a query that sees
    no key counts 0 (the kernel gives it lse 0)."""
    out, lse = _FLASH_CPU(queries, keys, values, attn_mask=mask, scale=scale)
    lse = lse.unsqueeze(-1)
    if mask is not None:
        sees_none = ~(mask > float("-inf")).any(dim=-1, keepdim=True)  # [B, 1, 1, 1]
        lse = lse.masked_fill(sees_none, float("-inf"))
    return lse, torch.ones_like(lse), out.float()


def _padding_mask(rows: torch.Tensor | None, start: int, end: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """The additive padding mask ``[B, 1, 1, end - start]`` of these rows (all rows when None)."""
    if _key_padding_additive is None:
        return None
    padding = _key_padding_additive if rows is None else _key_padding_additive.index_select(
        0, rows.to(_key_padding_additive.device))
    return padding[:, None, None, start:end].to(device=device, dtype=dtype)


def _reduce(scores: torch.Tensor, values: torch.Tensor) -> _Part:
    """Scores ``[..., n]`` (fp32, scaled, masked) over ``values`` ``[..., n, d]`` as (max, sum of exp,
    softmax-weighted values in fp32). A query whose every key is masked gives sum 0 and output 0."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top.nan_to_num(neginf=0.0)).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    # Normalised before the matmul, so its result stays within the values' range in a 16-bit dtype too.
    weights = weights.div_(total.clamp(min=torch.finfo(weights.dtype).tiny)).to(values.dtype)
    return top, total, torch.matmul(weights, values).float()


def _attend_shared_segment(queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           segment: _SharedSegment, layer: int, scale: float) -> _Part:
    """One segment's part, computed per group with the queries of its rows stacked, returned per row."""
    b, groups, rep, d = queries.shape
    count, slots = len(segment.first), segment.slots
    native, fused = _native(k_cache), _fused(queries)
    if layer not in segment.per_layer:  # each group's keys/values, gathered once per wave and layer
        rows = segment.first.to(k_cache.device)
        span = slice(segment.start, segment.end)
        keys = k_cache[:, :, span].index_select(0, rows)  # [G, g, n, d]
        if not (native or fused):  # the fp32 matmul reads keys as [G, g, d, n] fastest
            keys = keys.transpose(2, 3)
        dtype = k_cache.dtype if native else queries.dtype  # the kernel reads the cache's dtype
        segment.per_layer[layer] = (keys.contiguous().to(dtype),
                                    v_cache[:, :, span].index_select(0, rows).contiguous().to(dtype))
    keys, values = segment.per_layer[layer]
    slot_rows, row_slots = segment.slot_rows.to(queries.device), segment.row_slots.to(queries.device)
    stacked = queries.index_select(0, slot_rows).view(count, slots, groups, rep, d).transpose(1, 2)
    stacked = stacked.reshape(count, groups, slots * rep, d)

    def to_rows(t: torch.Tensor) -> torch.Tensor:  # [G, g, slots * rep, x] -> [b, g, rep, x]
        t = t.view(count, groups, slots, rep, t.shape[-1]).transpose(1, 2)
        return t.reshape(count * slots, groups, rep, t.shape[-1]).index_select(0, row_slots)

    # A group's rows share their padding: the group's first row's.
    if native:
        mask = _padding_mask(segment.first, segment.start, segment.end, torch.float32, queries.device)
        first = None if mask is None else _leading_padding.index_select(0, segment.first) - segment.start
        part = cpu_decode_kernel.attend(stacked, keys, values, 0, segment.end - segment.start,
                                        None if mask is None else mask[:, 0, 0], scale, first)
        return to_rows(part[0]), to_rows(part[1]), to_rows(part[2])
    mask = _padding_mask(segment.first, segment.start, segment.end, queries.dtype if fused else torch.float32,
                         queries.device)
    if fused:
        part = _fused_part(stacked, keys, values, mask, scale)
    else:
        scores = torch.matmul(stacked, keys).float().mul_(scale)
        part = _reduce(scores if mask is None else scores.add_(mask), values)
    return to_rows(part[0]), to_rows(part[1]), to_rows(part[2])


def _attend_per_row(queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, end: int,
                    scale: float) -> _Part:
    """Positions ``[start, end)`` of each row's own cache."""
    if _native(k_cache):
        return cpu_decode_kernel.attend(queries, k_cache, v_cache, start, end, _key_padding_additive, scale,
                                        _leading_padding)
    keys, values = k_cache[:, :, start:end].to(queries.dtype), v_cache[:, :, start:end].to(queries.dtype)
    if _fused(queries):
        # A KV group's query heads go in as its query positions, so the kernel reads each group's keys and
        # values once: with the kernel's own grouped-query heads (torch >= 2.9) it reads them per query head,
        # and one step of 32 rows x 1,225 positions (4 KV heads of 64, 2 query heads each) took 19.5 ms
        # against 5.3 ms in bf16 on a 2-core AMD EPYC (session 31, docs/rollout_benchmarks.md).
        mask = _padding_mask(None, start, end, queries.dtype, queries.device)
        return _fused_part(queries, keys, values, mask, scale)
    scores = torch.matmul(queries, keys.transpose(2, 3)).float().mul_(scale)
    mask = _padding_mask(None, start, end, torch.float32, scores.device)
    return _reduce(scores if mask is None else scores.add_(mask), values)


def _merge_parts(parts: list[_Part]) -> torch.Tensor:
    """The softmax-weighted values over all parts' keys: each part's output counts by its sum of
    exponentials, rescaled to the common maximum."""
    top = torch.stack([part[0] for part in parts]).amax(dim=0).nan_to_num(neginf=0.0)
    weights = [total * (part_top - top).exp() for part_top, total, _ in parts]
    out = sum(w * part[2] for w, part in zip(weights, parts))
    return out / sum(weights).clamp(min=torch.finfo(out.dtype).tiny)


@dataclass
class PrefillStats:
    """What a :func:`cpu_prefill_attention` block did: attention calls through the C++ kernel, and calls
    left to SDPA (another dtype, head size or device, or a prompt past :data:`PREFILL_MAX_POSITION_CHANNELS`)."""

    kernel: int = 0
    sdpa: int = 0


# Longest real prompt (positions x head channels) the prefill kernel takes: up to here it measured faster than
# SDPA, beyond it a row's keys and values outgrow the caches it tiles for (bench/prefill_attention.py, one row
# of 8,192 positions, 16 query heads over 8 KV heads of 128: 0.95x SDPA; of 4,096: 1.33x; session 35).
PREFILL_MAX_POSITION_CHANNELS = 4096 * 128


def sdpa_prefills_faster(dtype: torch.dtype) -> bool:
    """Whether torch's SDPA outruns the C++ prefill kernel in ``dtype`` on this CPU: bf16 where the CPU has
    AMX, whose tile GEMMs torch's CPU flash attention runs bf16 blocks on (bench/prefill_attention.py
    --dtype bf16 on session 46's AMX Xeon: SDPA 34.6 against the kernel's 67.6 ms, heads of 128 111 against
    256 ms; in fp32 the kernel 53.9 against 82.7). Without AMX the kernel measured the faster in bf16 too."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return dtype is torch.bfloat16 and has_amx is not None and bool(has_amx())


@contextlib.contextmanager
def cpu_prefill_attention() -> Iterator[PrefillStats]:
    """While the block runs, the local spec's core attention computes inference prefills (causal, rows
    left-padded or not) with the C++ prefill kernel (``parallel/cpu_decode_kernel.prefill_attention``) where
    it applies: CPU tensors of a dtype and head size it is built for, prompts of at most
    :data:`PREFILL_MAX_POSITION_CHANNELS` / head size real tokens, and not a dtype SDPA computes faster here
    (:func:`sdpa_prefills_faster`). It stops each tile of 12 queries at its own last position, where torch's
    flash kernel computes the diagonal in blocks of 256 x 512."""
    from megatron_grm.models import sdpa_attention

    stats = PrefillStats()

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, left_pads: Sequence[int] | None,
               scale: float) -> torch.Tensor | None:
        longest = query.shape[0] - (min(left_pads) if left_pads else 0)
        if query.device.type != "cpu" or not cpu_decode_kernel.prefill_available(query.dtype, query.shape[-1]) \
                or not query.dtype == key.dtype == value.dtype \
                or longest * query.shape[-1] > PREFILL_MAX_POSITION_CHANNELS or sdpa_prefills_faster(query.dtype):
            stats.sdpa += 1
            return None
        stats.kernel += 1
        return cpu_decode_kernel.prefill_attention(query, key, value, left_pads, scale)

    previous = sdpa_attention.prefill_attention_override
    sdpa_attention.prefill_attention_override = attend
    try:
        yield stats
    finally:
        sdpa_attention.prefill_attention_override = previous


def _supported(model: torch.nn.Module) -> str | None:
    """None when flash-decode computes exactly what the model's attention does; else the reason not."""
    from megatron.core.transformer.attention import SelfAttention

    config = model.config
    if getattr(model, "position_embedding_type", None) != "rope":
        return f"position embedding {getattr(model, 'position_embedding_type', None)!r} is not RoPE"
    if config.multi_latent_attention or config.window_size is not None or config.softmax_scale is not None:
        return "MLA, sliding-window attention or a custom softmax scale"
    kinds = {type(m) for m in model.modules() if isinstance(m, SelfAttention)}
    if kinds != {SelfAttention}:
        return f"attention modules {sorted(k.__name__ for k in kinds)} are not Megatron's SelfAttention"
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_grm.models.sdpa_attention import sdpa_core_attention_class

    # Flash-decode bypasses the core attention: one that does more than softmax(QK^T)V (Gemma-2's
    # soft-capping) would silently lose it.
    plain = (DotProductAttention, sdpa_core_attention_class())
    cores = {type(m.core_attention) for m in model.modules() if isinstance(m, SelfAttention)}
    if not all(core in plain for core in cores):
        return f"core attention {sorted(k.__name__ for k in cores)} is not a plain softmax(QK^T)V"
    return None


def enable_cpu_flash_decode(model: torch.nn.Module) -> bool:
    """Switch a CPU model's static-batch inference to the flash-decode path with the kernels above.

    Returns whether it was switched (and logs which path runs). Training forwards are unaffected:
    ``flash_decode`` only changes forwards that carry an inference context.
    """
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import megatron.core.transformer.attention as attention

    reason = _supported(model)
    if reason is not None:
        log.info("rollout decode path: Megatron static batching (RoPE over the whole KV cache per step): %s", reason)
        return False
    if attention.flash_attn_with_kvcache is None:
        attention.flash_attn_with_kvcache = flash_attn_with_kvcache
    if rope_utils.apply_rotary_emb_flash is None:
        rope_utils.apply_rotary_emb_flash = apply_rotary_emb
    model.config.flash_decode = True
    log.info("rollout decode path: Megatron flash-decode (keys rotated once, cached) with CPU kernels; %s",
             cpu_decode_kernel.describe())
    return True
