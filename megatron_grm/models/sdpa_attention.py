"""Core attention for Megatron-Core's local (non-TE) layer spec, computed by torch's SDPA.

Megatron-Core's local ``DotProductAttention`` materialises the scores: it expands K and V to every query
head (``repeat_interleave``), runs ``baddbmm`` into a ``[b·heads, s, s]`` buffer, masks and softmaxes in
fp32 with copies, and keeps scores and probabilities for backward. ``F.scaled_dot_product_attention`` does
the same math blockwise (flash attention on CPU, flash / memory-efficient kernels on CUDA): grouped-query
heads broadcast without copies, and backward keeps only q, k, v, the output and the row log-sum-exp. It is
what ``transformers`` uses for Llama and Qwen2, so the local spec and an HF model run the same kernel.

Same contract as ``DotProductAttention``: ``[s, b, heads, d]`` in, ``[s, b, heads·d]`` out, Megatron's
boolean mask (True = masked out); no mask means causal for ``AttnMaskType.causal`` (aligned to the last
key when queries continue a cache) and none for ``no_mask``. Gemma-2 keeps its own core (soft-capping).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# A faster attention for inference prefills: ``fn(query, key, value, left_pads, scale)`` over Megatron's
# ``[s, b, heads, d]`` tensors, causal per row after its ``left_pads`` (None: none), returning
# ``[s, b, heads, d]``, or None where it does not apply. Set for a rollout's waves by the backend
# (``parallel/cpu_decode.cpu_prefill_attention``); None: SDPA everywhere.
prefill_attention_override: Callable[..., Tensor | None] | None = None

# bf16 queries on the CPU attend on exact fp32 copies of q, k and v, the context rounded to bf16 once; the
# backward runs on fp32 copies too (autograd through the casts). Set by ``parallel/onednn_training.install``
# where bf16 linear layers train widened (a CPU without bf16 arithmetic): there torch's bf16 flash attention
# multiplies its blocks with a bf16 GEMM that oneDNN emulates or a generic loop runs (docs/performance.md, item 20).
widen_bf16 = False

# A mask built as a left-padded prefill's (``rollout.alignment.window_attention_mask`` from position 0) carries
# its rows' padding counts under this attribute, so mask_plan need not rebuild and compare the whole
# ``[b, s, s]`` pattern to find them: ~90 ms of a 32-prompt GRM-length rollout's prefill (session 44).
LEFT_PADS_ATTRIBUTE = "mgrm_left_pads"

# One forward's layers share the batch's mask tensor: plan it once, so SDPA (which keeps its mask for
# backward) holds one additive copy per forward instead of one per layer.
_last_plan: tuple[Tensor, int, MaskPlan] | None = None  # (mask, its version counter, plan)


@dataclass(frozen=True)
class MaskPlan:
    """How SDPA attends under one of Megatron's boolean masks. Neither field set: ``is_causal`` over the
    whole row (:func:`causal_with_isolated_padding`). ``left_pads``: per row, causal over the real tokens
    after that many padding positions (:func:`left_padding_of_causal`). ``additive``: any other mask, as
    SDPA's 0 / -inf mask."""

    additive: Tensor | None = None
    left_pads: tuple[int, ...] | None = None

    @property
    def is_causal(self) -> bool:
        return self.additive is None and self.left_pads is None


def causal_with_isolated_padding(mask: Tensor) -> bool:
    """Whether Megatron's bool mask ``[b, 1, s, s]`` (True = masked out) is, in every row, causal over a
    prefix of real tokens followed by padding positions that see only themselves: one document per row,
    right-padded (``data/packing.collate_padded``, GRPO's and the rollout's batches). Then ``is_causal``
    gives the real positions the same attention without reading a mask (and SDPA skips the blocks above
    the diagonal); only the padding positions' outputs change, which nothing reads and whose gradient is 0."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2]:
        return False
    allowed = ~mask[:, 0]
    s = allowed.shape[-1]
    index = torch.arange(s, device=mask.device)
    causal = index[None, :] <= index[:, None]
    real_rows = index[None, :] < allowed[:, :, 0].sum(-1)[:, None]  # the rows that see the first key
    expected = torch.where(real_rows[:, :, None], causal, torch.eye(s, dtype=torch.bool, device=mask.device))
    return torch.equal(allowed, expected)


def left_padding_of_causal(mask: Tensor) -> tuple[int, ...] | None:
    """Each row's number of leading padding positions when Megatron's bool mask ``[b, 1, s, s]`` (True =
    masked out) is the left-padded prefill's (``rollout.alignment.window_attention_mask`` from position 0):
    causal over the real tokens after the padding, and a padding query sees only itself. None otherwise.
    The last query is a real token (or sees only itself), so its first visible key is where the row's
    real tokens start."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2]:
        return None
    allowed = ~mask[:, 0]
    s = allowed.shape[-1]
    pads = allowed[:, -1].int().argmax(-1)  # the first key the last query sees
    index = torch.arange(s, device=mask.device)
    causal = index[None, :] <= index[:, None]
    eye = torch.eye(s, dtype=torch.bool, device=mask.device)
    expected = (causal[None] & (index[None, None, :] >= pads[:, None, None])) | eye[None]
    return tuple(pads.tolist()) if torch.equal(allowed, expected) else None


def mask_plan(mask: Tensor, dtype: torch.dtype) -> MaskPlan:
    """How to attend under Megatron's boolean mask (True = masked out), cached per mask tensor: every layer
    of one forward passes the same one."""
    global _last_plan
    version = -1 if mask.is_inference() else mask._version  # inference tensors keep no version counter
    if _last_plan is not None and _last_plan[0] is mask and _last_plan[1] == version \
            and (_last_plan[2].additive is None or _last_plan[2].additive.dtype == dtype):  # unmodified since
        return _last_plan[2]
    declared = getattr(mask, LEFT_PADS_ATTRIBUTE, None)
    if declared is not None:  # built by window_attention_mask: no pattern to verify
        plan = MaskPlan(left_pads=declared) if any(declared) else MaskPlan()
    elif causal_with_isolated_padding(mask):
        plan = MaskPlan()
    elif (pads := left_padding_of_causal(mask)) is not None:
        plan = MaskPlan(left_pads=pads)
    else:
        plan = MaskPlan(additive=torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")))
    _last_plan = (mask, version, plan)
    return plan


def attend_left_padded(q: Tensor, k: Tensor, v: Tensor, pads: Sequence[int], **sdpa: Any) -> Tensor:
    """SDPA over ``[b, heads, s, d]`` rows whose real tokens follow ``pads[r]`` padding positions: each
    row's real part causally on its own (``is_causal`` skips the blocks above the diagonal, and no
    padding is read), each padding query its own value (it sees only itself). The same numbers as SDPA
    under the whole mask, which computes every block of the padded square (docs/rollout_benchmarks.md, session 31)."""
    group = q.shape[1] // k.shape[1]
    rows = []
    for r, pad in enumerate(pads):
        real = F.scaled_dot_product_attention(q[r:r + 1, :, pad:], k[r:r + 1, :, pad:], v[r:r + 1, :, pad:],
                                              is_causal=True, **sdpa)
        if pad:
            alone = v[r:r + 1, :, :pad].repeat_interleave(group, dim=1)
            real = torch.cat([alone, real], dim=2)
        rows.append(real)
    return torch.cat(rows)


def _causal_mask(sq: int, sk: int, device: torch.device) -> Tensor:
    """Bool ``[sq, sk]``, True = allowed: query i is position ``sk - sq + i`` and sees keys up to it."""
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    return torch.arange(sk, device=device)[None, :] <= q_pos


def _class() -> type:
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SdpaCoreAttention(DotProductAttention):
        """``DotProductAttention`` with its score/softmax/context math replaced by one SDPA call."""

        def __init__(self, config, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            if self.softmax_offset is not None:
                raise ValueError(f"SDPA core attention supports softmax_type='vanilla', not {config.softmax_type!r}")

        def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("SDPA core attention supports neither packed_seq_params nor attention_bias "
                                 "(use the Transformer Engine spec)")
            sq, b, n, hn = query.shape
            sk = key.shape[0]
            dtype = query.dtype
            widen = widen_bf16 and dtype == torch.bfloat16 and query.device.type == "cpu"
            compute = torch.float32 if widen else dtype
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            attn_mask, is_causal, left_pads = None, False, None
            if attention_mask is not None:
                plan = mask_plan(attention_mask, compute)
                attn_mask, left_pads = plan.additive, plan.left_pads
                is_causal = plan.is_causal and sq > 1  # the mask is square: sq == sk
            elif mask_type == AttnMaskType.causal and sq > 1:
                if sq == sk:
                    is_causal = True
                else:
                    attn_mask = _causal_mask(sq, sk, query.device)
            dropout = self.attention_dropout.p if self.training else 0.0
            override = prefill_attention_override
            if (override is not None and dropout == 0 and sq == sk > 1 and (is_causal or left_pads is not None)
                    and not torch.is_grad_enabled()):
                context = override(query, key, value, left_pads, self.softmax_scale)
                if context is not None:
                    return context.reshape(sq, b, n * hn)
            q, k, v = (t.permute(1, 2, 0, 3).to(compute) for t in (query, key, value))  # [b, heads, s, d]

            def attend() -> Tensor:
                sdpa = dict(dropout_p=dropout, scale=self.softmax_scale, enable_gqa=k.shape[1] != n)
                if left_pads is not None:
                    return attend_left_padded(q, k, v, left_pads, **sdpa)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **sdpa)

            if dropout > 0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():  # as Megatron's core: per-TP-rank dropout
                    context = attend()
            else:
                context = attend()
            return context.to(dtype).permute(2, 0, 1, 3).reshape(sq, b, n * hn)

    return SdpaCoreAttention


@functools.cache
def sdpa_core_attention_class() -> type:
    """The class (built lazily so importing this module does not import Megatron)."""
    return _class()
