"""Rollout GEMMs on the CPU through oneDNN, on weights put into its blocked layout once per wave.

A decode step multiplies one row per sequence by every weight matrix of the model. torch's fp32 ``mm`` on
the CPU goes to MKL; on the project's AMD EPYC machine its 32-row GEMMs ran at 40-68 GFLOP per CPU-second
where oneDNN on a weight put into its blocked layout once ran at 79-104, and prefill-sized ones 1.1-1.2x
faster too (``bench/onednn_linear.py``). Within a wave the weights do not change, so
:func:`packed_linears` reorders each large weight once, at its first use in the wave
(``torch.ops.mkldnn._reorder_linear_weight``), and runs the local GEMM of Megatron's ``ColumnParallelLinear``
/ ``RowParallelLinear`` through ``torch.ops.mkldnn._linear_pointwise``, the pair of ops torch's own CPU
compiler uses for frozen linear layers. The arithmetic stays in the weights' dtype, fp32 or bf16; only the
summation order differs (relative differences ~1e-6 in fp32). bf16 weights (a bf16 model's rollouts) take
the same path: on a Xeon with AMX, one layer's and the output layer's bf16 GEMMs took 1.46x less CPU time
at 32 rows and 1.05x at 1,024 than torch's ``mm`` (session 26, ``bench/onednn_linear.py --dtype bf16``).
Megatron's module code, its tensor-parallel collectives and its bias handling stay as they are: only
``_forward_impl``, the GEMM itself, is swapped for the wave. Where the C++ GEMM is on
(``cpu_decode_kernel.linear_kernel_rows``: on AVX2 CPUs at every row count, where it was measured faster
from a decode step's 32 to a prefill's 8,192; on AVX-512 ones up to a decode step's 32), fp32 GEMMs of
that many rows run it on the weight packed for it instead, and oneDNN keeps a bf16 model's GEMMs on CPUs
with a bf16 GEMM, but for a decode step's (up to 32 rows) on CPUs with AMX: those run
``csrc/amx_linear.cpp`` on the weight packed for its tiles, whose few hundred bytes of code stay cheap to
fetch between the attention kernel's passes over the KV cache where oneDNN's call did not (see that file).
A layer keeps one packed copy at a time: a wave's prefill and its decode steps switch once.

On a CPU without a bf16 GEMM (no AVX512-BF16 or AMX: e.g. an AVX2-only EPYC) torch's bf16 matmul runs a
generic loop: a bf16 wave of ``bench/rollout.py``'s distinct GRM prompts prefilled in 64.9 s against ~10 s
in fp32 on such a machine (session 37). On an AVX-512 CPU without them (an Ice Lake Xeon, session 61) oneDNN
emulates bf16 at a fifth of its fp32 rate: the same wave prefilled in 13.1 s against 4.0 s in fp32. On both
bf16 weights are reordered as fp32 once per wave and the GEMM runs in fp32 on the bf16 inputs: products of
bf16 values are exact in fp32 and the sums are fp32, as in a bf16 GEMM, and the output is rounded to bf16
once; only the summation order differs.

Where it does not pay or does not apply, Megatron's path runs: forwards with autograd on (training, whose
forward GEMMs ``parallel/onednn_training.py`` puts on oneDNN without a reorder where that is faster),
sequence-parallel layers (their GEMM gathers the sequence first), weights other than fp32 / bf16, inputs of
another dtype than the weight's, and weights under :data:`PACK_MIN_ELEMENTS` (oneDNN's fixed cost per call,
~10 µs above torch's, exceeds what it saves) where the C++ GEMM does not run. Where it does, such weights (the
CPU demo's model has only such) are packed for it too: it has no per-call cost like oneDNN's. Measured on the
2-core AVX2 EPYC (session 55) at the demo model's shape (``bench/rollout.py``'s model with ``--hidden 128
--layers 4 --heads 4 --ffn 512 --vocab 256``, 128 rows of 250-330-token prompts, 128 new tokens; our engine
alone, the two alternating in one process, medians of 8): 2.31 s a rollout against 2.68 s with them on torch's
matmul. That model's five GEMM shapes alone (wall clock): the C++ GEMM 1.30-1.64x faster than torch's matmul
from 4 to 64 rows, 0.82-1.06x at 128 (two runs), 1.00-1.04x from 256 to 8,192, 0.85x at one row.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_grm.parallel import cpu_decode_kernel

log = logging.getLogger(__name__)

# Smallest weight (out x in) to reorder: from 512 x 512 up oneDNN was faster at 32 rows (bench/onednn_linear.py),
# while 384 x 128 (a layer of the CPU demo's model) took 18 vs 13 µs at 8 rows (scratch, wall clock).
PACK_MIN_ELEMENTS = 1 << 18


# Weight dtypes a rollout may reorder (training's forward GEMMs, parallel/onednn_training.py, take fp32 only).
ROLLOUT_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's reorder-once linear ops and they compute ``F.linear`` in ``dtype``
    (bf16 needs a CPU oneDNN runs bf16 on: AVX512-BF16 / AMX, or its AVX512 emulation). Probed once per
    dtype, however it is asked for, outside any device or autocast context the caller may be in."""
    return _probe(dtype)


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with torch.device("cpu"), torch.autocast("cpu", enabled=False), torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            x, w, b = (t.to(dtype) for t in (torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g),
                                             torch.randn(8, generator=g)))
            got = linear(x, reorder(w, 3), b)
    except RuntimeError as err:
        log.info("oneDNN %s linear unavailable (%s): rollout GEMMs stay on torch's matmul", dtype, err)
        return False
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (8 bits)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    return got.dtype == dtype and bool(torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance))


def reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` ([out, in], as ``F.linear`` takes it) in oneDNN's layout for inputs of about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(1, rows))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight as :func:`reorder` returned it; ``x`` is ``[..., in]``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16's dot products or AMX's tiles), as torch detects it.
    oneDNN computes bf16 GEMMs on other AVX-512 CPUs too, by emulation, at a fifth of its fp32 rate there."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def widens_bf16(onednn_bf16: bool, onednn_fp32: bool, native_bf16: bool) -> bool:
    """Whether a bf16 weight is multiplied as its fp32 copy: where oneDNN has an fp32 linear, and its bf16 one
    is missing (an AVX2 CPU) or emulated (an AVX-512 CPU without AVX512-BF16 or AMX). Emulated, one layer's and
    the output layer's bf16 GEMMs ran at 27-30 GFLOP per CPU-second at 32 rows and 30-35 at 1,024 on session
    61's Ice Lake Xeon, against 92-115 and 119-154 in fp32 (``bench/onednn_linear.py --dtype bf16`` / default)."""
    return onednn_fp32 and not (onednn_bf16 and native_bf16)


def gemm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a weight of ``dtype`` is reordered and multiplied in here: its own where oneDNN computes it,
    but fp32 for bf16 where :func:`widens_bf16` (see the module's docstring); None where neither works."""
    if dtype == torch.bfloat16 and widens_bf16(available(dtype), available(torch.float32), cpu_multiplies_bf16()):
        return torch.float32
    return dtype if available(dtype) else None


def worth_packing(weight: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                  min_elements: int | None = None) -> bool:
    """A 2-D CPU weight of one of ``dtypes``, of at least ``min_elements`` (default :data:`PACK_MIN_ELEMENTS`),
    that this build's oneDNN multiplies correctly (in its own dtype, or a bf16 one widened to fp32:
    :func:`gemm_dtype`)."""
    least = PACK_MIN_ELEMENTS if min_elements is None else min_elements
    return (weight is not None and weight.dtype in dtypes and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.numel() >= least and gemm_dtype(weight.dtype) is not None)


@dataclass
class PackStats:
    """What a :func:`packed_linears` block did: layers it took over, weights it reordered, GEMMs it ran."""

    layers: int = 0
    reordered: int = 0
    widened: int = 0  # bf16 weights reordered or packed as fp32 (a CPU without a bf16 GEMM)
    calls: int = 0
    panels: int = 0  # weights packed for the C++ GEMM
    kernel_calls: int = 0  # of the calls, those that ran it
    amx_tiles: int = 0  # bf16 weights packed for the AMX GEMM
    amx_calls: int = 0  # of the calls, those that ran it
    fallbacks: int = 0  # GEMMs of taken layers that still ran Megatron's path (autograd on, ...)
    skipped: int = 0  # layers left to Megatron: small weights or other dtypes, sequence parallelism


class _PackedGemm:
    """A layer's ``_forward_impl`` for the block: the reordered weight, rebuilt when the weight changes. fp32
    GEMMs (bf16 ones widened included) of at most ``kernel_rows`` rows run the C++ GEMM on the weight packed
    for it instead, and bf16 ones of at most that many and ``AMX_ROWS`` rows the AMX GEMM where the CPU has
    AMX; the layer keeps one of its copies, the one its last GEMM used. A weight under
    :data:`PACK_MIN_ELEMENTS` runs the C++ GEMM where it would, and Megatron's GEMM everywhere else, but for a
    widened bf16 one, whose GEMMs beyond the C++ GEMM's rows take oneDNN's fp32 GEMM: torch's bf16 matmul is
    emulated there (the demo model's shape in bf16, 128 rows on session 61's Ice Lake Xeon: prefill 1.29 ->
    0.65 s, decode forward 14.7 -> 11.2 ms; ``bench/rollout.py --dtype bf16``)."""

    def __init__(self, layer: torch.nn.Module, rows: int, stats: PackStats,
                 widen_bf16: bool | None = None, kernel_rows: int = 0) -> None:
        self.layer, self.rows, self.stats = layer, rows, stats
        self.widen_bf16 = widen_bf16  # None: where this CPU has no bf16 GEMM (gemm_dtype)
        self.kernel_rows = kernel_rows
        self.source: torch.Tensor | None = None
        self.version = -1
        self.packed: torch.Tensor | None = None  # oneDNN's layout
        self.panels: torch.Tensor | None = None  # the C++ GEMM's (cpu_decode_kernel.pack_linear_weight)
        self.tiles: torch.Tensor | None = None  # the AMX GEMM's (cpu_decode_kernel.pack_amx_weight)
        self.widened = False  # the weight is multiplied as a bf16 one's fp32 copy
        self.small = False  # under PACK_MIN_ELEMENTS: the C++ GEMM or Megatron's, never oneDNN

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() or kwargs.get("sequence_parallel") or input.dtype != weight.dtype:
            return self._megatrons_gemm(input, weight, *args, **kwargs)
        if weight is not self.source or weight._version != self.version:  # first use, or a changed weight
            # checked here, not per call: the same within a wave
            if not worth_packing(weight, ROLLOUT_DTYPES, 0 if self.kernel_rows else None):
                return self._megatrons_gemm(input, weight, *args, **kwargs)
            self.widened = weight.dtype == torch.bfloat16 and (
                gemm_dtype(weight.dtype) == torch.float32 if self.widen_bf16 is None else self.widen_bf16)
            self.small = weight.numel() < PACK_MIN_ELEMENTS
            self.source, self.version = weight, weight._version  # a tied output layer passes the embedding's
            self.packed = self.panels = self.tiles = None
        fp32 = weight.dtype == torch.float32 or self.widened
        on_kernel = fp32 and self.kernel_rows and input.numel() <= self.kernel_rows * input.shape[-1]
        if self.small and not on_kernel and not self.widened:  # oneDNN's cost per call exceeds what it saves
            return self._megatrons_gemm(input, weight, *args, **kwargs)
        self.stats.calls += 1
        bias = kwargs.get("bias", args[0] if args else None)
        if (weight.dtype is torch.bfloat16 and not self.widened and self.kernel_rows
                and input.numel() <= min(self.kernel_rows, cpu_decode_kernel.AMX_ROWS) * input.shape[-1]
                and (bias is None or bias.dtype is torch.bfloat16) and cpu_decode_kernel.amx_available()):
            if self.tiles is None:
                self.tiles, self.packed = cpu_decode_kernel.pack_amx_weight(weight), None
                self.stats.amx_tiles += 1
            self.stats.amx_calls += 1
            return cpu_decode_kernel.amx_linear(input, self.tiles, weight.shape[0], bias)
        if on_kernel:
            if self.panels is None:
                self.panels, self.packed = cpu_decode_kernel.pack_linear_weight(weight.float()), None
                self.tiles = None
                self.stats.panels += 1
                self.stats.widened += self.widened
            self.stats.kernel_calls += 1
            if input.dtype is torch.float32 and (bias is None or bias.dtype is torch.float32):  # no round trips
                return cpu_decode_kernel.packed_linear(input, self.panels, weight.shape[0], bias)
            out = cpu_decode_kernel.packed_linear(input.float(), self.panels, weight.shape[0],
                                                  None if bias is None else bias.float())
            return out.to(input.dtype)
        if self.packed is None:
            self.packed = reorder(weight.float() if self.widened else weight, self.rows)
            self.panels = self.tiles = None
            self.stats.reordered += 1
            self.stats.widened += self.widened
        if self.widened:  # bf16 operands multiplied in fp32, the output rounded once
            return linear(input.float(), self.packed, None if bias is None else bias.float()).to(input.dtype)
        return linear(input, self.packed, bias)

    def _megatrons_gemm(self, input: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.stats.fallbacks += 1
        return type(self.layer)._forward_impl(self.layer, input, weight, *args, **kwargs)


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int, kernel_rows: int = 0) -> Iterator[PackStats]:
    """While the block runs (one wave of ``rows`` sequences), the model's large fp32/bf16 Megatron linear layers
    multiply through oneDNN on weights reordered once; their reordered copies are dropped on exit. Its fp32
    GEMMs of at most ``kernel_rows`` rows (:func:`cpu_decode_kernel.linear_kernel_rows`) run the C++ GEMM
    instead; with it on, small weights are taken for it too."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    stats = PackStats()
    taken: list[torch.nn.Module] = []
    if available():
        for layer in model.modules():
            if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                continue
            weight = layer.weight  # None: a tied output layer, given the embedding's weight with each call
            if ((weight is not None and not worth_packing(weight, ROLLOUT_DTYPES, 0 if kernel_rows else None))
                    or getattr(layer, "sequence_parallel", False)):
                stats.skipped += 1
                continue
            layer._forward_impl = _PackedGemm(layer, rows, stats, kernel_rows=kernel_rows)
            taken.append(layer)
    stats.layers = len(taken)
    try:
        yield stats
    finally:
        for layer in taken:
            del layer._forward_impl  # back to the class's method
