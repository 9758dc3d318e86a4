"""The CPU rollout's attention and GEMMs as C++ loops (``csrc/``), built on first use with the machine's C++ compiler
and loaded with ctypes: a decode step's attention over the KV cache (``decode_attention.cpp``), a
prefill's causal attention row by row (``prefill_attention.cpp``); the rollout's fp32 GEMMs
(``linear.cpp``) and, on CPUs with AMX, a bf16 decode step's (``amx_linear.cpp``). The elementwise passes
(``elementwise.cpp``: RMSNorm, SwiGLU, RoPE) serve rollouts (``parallel/cpu_elementwise.py``) and, with
their backward passes, CPU training (``parallel/elementwise_autograd.py``). ``read_probe.cpp`` reads a buffer
as fast as the machine allows, for the benches' rooflines (:func:`read_probe`).

At GRM prompt lengths a CPU decode step is mostly the read of the KV cache, and torch's kernels read it at
well under the memory's rate: the batched matmuls (scores, softmax, weighted values: three passes) at
~17-19 GB/s on the project's 2-core AMD EPYC, the fused flash kernel in bf16 at ~8 GB/s. The C++ loop reads
each key and value once, block by block with an online softmax, and ran one step of 4 layers (32 rows x
1,230 positions, 4 KV heads of 64, 2 query heads each) in 9.8-10.6 ms against torch's 18.3-20.8 ms in fp32,
as fast as a plain sum of the same bytes, and in 6.7-9.0 ms against 17.1-24.5 ms in bf16
(``bench/decode_attention.py``, session 33). Since session 43 it scores a few positions at once in AVX2
register tiles and prefetches the next block (AVX-512 CPUs run the same tiles: 10.6 against 13.4 ms for a
zmm-register kernel on a 2-core Xeon, session 45). The
prefill kernel stops each tile of queries at its own last position where torch's flash kernel computes the
diagonal in blocks of 256 x 512 (``bench/prefill_attention.py``).
The C++ GEMM keeps a tile of 6 rows x 16 columns in AVX2 registers over a weight packed in panels of 16
columns (:func:`pack_linear_weight`, once per wave) and prefetches the next panel while it runs: at 32 rows
on the AVX2 EPYC it ran one Llama layer's and the output layer's GEMMs in 5.58 against oneDNN's 7.29 ms
(1.31x; ``bench/onednn_linear.py --rows 1 32 256 1024``, weights hot in cache, session 41), 1.06-1.09x at
4,096-8,192 rows, and a decode forward's linears of ``bench/rollout.py``'s model in 8.2 against 11.8 ms
(the bench with ``MEGATRON_GRM_CPU_LINEAR_KERNEL=0`` minutes later). oneDNN's packed fp32 GEMM runs the
decode step's shapes at 53-60% of the core's FMA peak. It runs by default only where and at the row counts
where it was measured faster (:data:`LINEAR_KERNEL_ROWS`: on an AVX-512 Xeon, a decode step's 32 rows but
not a prefill's; ``MEGATRON_GRM_CPU_LINEAR_KERNEL=1`` / ``0`` forces it on / off).
No package on the registries ships such kernels for torch 2.13's CPU build, and torch's own extension builder
would compile torch's headers (a minute per machine); this file needs only ``c++`` (a few seconds).

The library is cached per machine under ``$MEGATRON_GRM_KERNEL_DIR`` (default
``~/.cache/megatron_grm/kernels``), named by a hash of the sources, the flags, the compiler's version and
the CPU's feature flags (``-march=native``: a cache shared between different nodes keeps one build per CPU
kind). One process builds while the others wanting the same library wait on a lock file beside it (the ranks
of a job on an empty cache run the compiler once, not once each); the build is written to a temporary file
and renamed into place, so no process sees half a library, also where the file system has no lock. A build
the compiler rejects leaves its errors under the library's name (``.failed``), so the other ranks and later
processes report them instead of each compiling again; deleting that file makes the next process retry. Without
a compiler, or with ``MEGATRON_GRM_CPU_DECODE_KERNEL=0``, :func:`available` is False and
``parallel/cpu_decode.py`` keeps torch's path; the log says which runs. The prefill kernel needs
AVX-512 or AVX2 (with FMA and F16C) besides (:func:`prefill_available`); elsewhere the prefill stays on
torch's SDPA. :func:`describe` names the instruction set the kernels were built for.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_grm.parallel import huge_pages

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("decode_attention.cpp", "prefill_attention.cpp", "linear.cpp", "elementwise.cpp",
                             "amx_linear.cpp", "read_probe.cpp"))
# Compiled once per cache dtype (-DMGRM_DECODE_DTYPE), side by side: each dtype instantiates every head size's
# kernels, and as one unit they were two thirds of a build's CPU time.
PER_DTYPE_SOURCE = "decode_attention.cpp"
# Included by the sources: part of the hash.
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("kernel_math.h", "simd16.h"))
# No -ffast-math: it would let the compiler assume no infinities, and masked scores are -inf.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DISABLE_VARIABLE = "MEGATRON_GRM_CPU_DECODE_KERNEL"

_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def available(dtype: torch.dtype) -> bool:
    """Whether a KV cache of ``dtype`` can be read by the C++ kernel here (built, or buildable now; fp16 where
    the compiler has ``_Float16``)."""
    return dtype in _compiled_dtypes()


def describe() -> str:
    """One line for the log: which decode attention runs, and why."""
    lib = _library()
    if lib is not None:
        simd = lib.mgrm_attention_simd().decode()
        prefill = f"and prefill attention kernels, {simd}" if _prefill_built() else \
            "attention kernel (prefill attention: torch's SDPA, the kernels were built without AVX-512 or AVX2)"
        return f"C++ decode {prefill} ({_library_path()})"
    return f"torch decode attention (C++ kernel unavailable: {unavailable_reason()})"


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, end: int,
           mask: torch.Tensor | None, scale: float, row_start: torch.Tensor | None = None) -> _Part:
    """Each query ``[B, G, R, D]`` of KV group ``g`` over ``keys``/``values`` ``[B, G, positions, D]``
    (any strides, channels contiguous; fp32, bf16 or fp16) at positions ``[start, end)``, with the additive
    fp32 ``mask`` ``[B, >= end]`` indexed by the same positions. ``row_start`` ``[B]`` (int64) moves a row's
    start later: positions before it (a row's left padding, which the mask hides anyway) are not read.
    Returns fp32 (max score, sum of exp, normalised weighted values), shaped ``[B, G, R, 1]``,
    ``[B, G, R, 1]``, ``[B, G, R, D]``."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ decode attention kernel unavailable: {unavailable_reason()}")
    b, g, r, d = queries.shape
    if keys.dtype != values.dtype or not available(keys.dtype):
        raise ValueError(f"keys/values of dtype {keys.dtype}/{values.dtype}: the kernel here reads "
                         f"{[str(t) for t in DTYPE_CODES if available(t)]}")
    if keys.shape[:2] != (b, g) or values.shape[:2] != (b, g) or keys.shape[-1] != d or values.shape[-1] != d:
        raise ValueError(f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)} / values "
                         f"{tuple(values.shape)}")
    if not 0 <= start <= end <= min(keys.shape[2], values.shape[2]):
        raise ValueError(f"positions [{start}, {end}) outside a cache of {keys.shape[2]}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys/values need contiguous channels")
    q = queries.float().contiguous()
    if mask is not None:
        if mask.dtype != torch.float32 or mask.shape[0] != b or mask.shape[1] < end or mask.stride(-1) != 1:
            raise ValueError(f"mask {tuple(mask.shape)} {mask.dtype}: need fp32 [{b}, >= {end}], contiguous rows")
    if row_start is not None:
        if row_start.shape != (b,):
            raise ValueError(f"row_start {tuple(row_start.shape)}: need one start per row ({b})")
        row_start = row_start.to(torch.int64).contiguous()
    top, total = torch.empty(b, g, r, 1), torch.empty(b, g, r, 1)
    out = torch.empty(b, g, r, d)
    status = lib.mgrm_decode_attention(
        DTYPE_CODES[keys.dtype], torch.get_num_threads(), q.data_ptr(), b, g, r, d,
        keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        values.data_ptr(), values.stride(0), values.stride(1), values.stride(2),
        None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
        None if row_start is None else row_start.data_ptr(), start, end, scale,
        top.data_ptr(), total.data_ptr(), out.data_ptr())
    if status != 0:
        raise RuntimeError(f"mgrm_decode_attention returned {status}")
    return top, total, out


PREFILL_DIMS = (16, 32, 64, 128)  # head sizes the prefill kernel is compiled for


def prefill_available(dtype: torch.dtype, dim: int) -> bool:
    """Whether :func:`prefill_attention` runs here for heads of ``dim`` channels in ``dtype``: the library
    built with AVX-512 or AVX2, a dtype it reads, a head size of :data:`PREFILL_DIMS`."""
    return dim in PREFILL_DIMS and available(dtype) and _prefill_built()


@functools.cache
def _prefill_built() -> bool:
    lib = _library()
    return lib is not None and bool(lib.mgrm_prefill_attention_built())


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pads: Sequence[int] | None,
                      scale: float) -> torch.Tensor:
    """Causal attention of a left-padded prefill in Megatron's layout: ``query`` ``[s, b, Hq, D]``,
    ``key``/``value`` ``[s, b, Hkv, D]`` (one dtype, channels contiguous, any other strides), ``pads[r]``
    leading padding positions in row ``r`` (None: none). Each real query attends causally over its row's real
    keys; a padding query sees only itself (its output is its value: nothing reads it), as
    ``models/sdpa_attention.attend_left_padded`` computes. Returns ``[s, b, Hq, D]`` contiguous, in the
    inputs' dtype. fp32 arithmetic; bf16 inputs on CPUs with AVX512-BF16 multiply in pairs (vdpbf16ps, fp32 sums,
    the softmax weights rounded to bf16 for the values: as exact as torch's SDPA in bf16)."""
    lib = _library()
    s, b, h_q, d = query.shape
    h_kv = key.shape[2]
    if lib is None or not prefill_available(query.dtype, d):
        why = (unavailable_reason() if lib is None
               else f"needs AVX-512 or AVX2 and heads of {PREFILL_DIMS} channels")
        raise RuntimeError(f"C++ prefill attention unavailable for {query.dtype} heads of {d}: {why}")
    if key.shape != (s, b, h_kv, d) or value.shape != key.shape or h_kv == 0 or h_q % h_kv:
        raise ValueError(f"query {tuple(query.shape)} does not match key {tuple(key.shape)} / value "
                         f"{tuple(value.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if any(t.stride(-1) != 1 or t.device.type != "cpu" for t in (query, key, value)):
        raise ValueError("query/key/value need to be CPU tensors with contiguous channels")
    starts = None
    if pads is not None:
        starts = torch.as_tensor(list(pads), dtype=torch.int64)
        if starts.shape != (b,) or bool(((starts < 0) | (starts >= s)).any()):
            raise ValueError(f"pads {list(pads)}: need one count in [0, {s}) per row ({b})")
    out = torch.empty(s, b, h_q, d, dtype=query.dtype)
    status = lib.mgrm_prefill_attention(
        DTYPE_CODES[query.dtype], torch.get_num_threads(), b, s, h_q, h_kv, d,
        query.data_ptr(), query.stride(1), query.stride(0), query.stride(2),
        key.data_ptr(), key.stride(1), key.stride(0), key.stride(2),
        value.data_ptr(), value.stride(1), value.stride(0), value.stride(2),
        out.data_ptr(), out.stride(1), out.stride(0), out.stride(2),
        None if starts is None else starts.data_ptr(), scale)
    if status != 0:
        raise RuntimeError(f"mgrm_prefill_attention returned {status}")
    return out


LINEAR_VARIABLE = "MEGATRON_GRM_CPU_LINEAR_KERNEL"
ALL_ROWS = 1 << 62
# Up to how many rows the C++ GEMM was measured faster than oneDNN's, per instruction set: every row count
# on the AVX2 EPYC (session 41); on a 2-core AVX-512 Xeon with AMX (session 45, bench/onednn_linear.py, one
# layer's and the output layer's GEMMs, oneDNN / C++) 1.20x at 8 rows and 1.17x at 32, 0.97x at 64 and
# 0.88-0.95x from 128 to 8,192: there a decode step's GEMMs run it and a prefill's stay on oneDNN. Elsewhere it
# runs only with MEGATRON_GRM_CPU_LINEAR_KERNEL=1.
LINEAR_KERNEL_ROWS = {"AVX2": ALL_ROWS, "AVX-512": 32}


def linear_kernel_rows() -> int:
    """The most rows of a rollout's fp32 GEMM that :func:`packed_linear` runs (0: none): with the library built
    here, :data:`LINEAR_KERNEL_ROWS` for the instruction set it was built for, or every row count with
    ``MEGATRON_GRM_CPU_LINEAR_KERNEL=1``, none with 0."""
    lib = _library()
    if lib is None:
        return 0
    choice = os.environ.get(LINEAR_VARIABLE, "")
    if choice in ("0", "1"):
        return ALL_ROWS if choice == "1" else 0
    return LINEAR_KERNEL_ROWS.get(lib.mgrm_attention_simd().decode(), 0)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` (as ``F.linear`` takes it) as fp32 panels of the kernel's width ``P``,
    ``[ceil(out / P), in, P]``, zero-padded past ``out``: the layout :func:`packed_linear` reads."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ GEMM unavailable: {unavailable_reason()}")
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"weight {tuple(weight.shape)} on {weight.device}: need a 2-D CPU tensor")
    width = lib.mgrm_linear_panel()
    out, inner = weight.shape
    panels = -(-out // width)
    padded = torch.zeros(panels * width, inner, dtype=torch.float32)
    padded[:out] = weight.detach()
    packed = huge_pages.host_empty((panels, inner, width), torch.float32)
    return packed.copy_(padded.view(panels, width, inner).transpose(1, 2))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in fp32 with the weight as :func:`pack_linear_weight` returned it: ``x``
    ``[..., in]`` fp32 (any number of rows), the result ``[..., out_features]``. Called 17 times a decode step
    of a 4-layer model, so its checks are the cheap kind (each torch attribute read costs ~0.1-2 us; this
    wrapper took ~14 us a call over the C++ call before session 44, ~5 us since)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ GEMM unavailable: {unavailable_reason()}")
    panels, inner, width = packed.shape
    if width != lib.linear_panel_width or packed.dtype is not torch.float32 or not packed.is_contiguous():
        raise ValueError(f"packed weight {tuple(packed.shape)} {packed.dtype}: not from pack_linear_weight here")
    if not (panels - 1) * width < out_features <= panels * width:
        raise ValueError(f"{out_features} output features do not fit {panels} panels of {width}")
    if x.dtype is not torch.float32 or x.shape[-1] != inner or not x.is_cpu:
        raise ValueError(f"input {tuple(x.shape)} {x.dtype} on {x.device}: need fp32 CPU [..., {inner}]")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype is not torch.float32):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype}: need fp32 [{out_features}]")
    if not x.is_contiguous():
        x = x.contiguous()
    return _gemm(lib.mgrm_packed_linear, x, x.numel() // inner, packed, out_features, bias)


def _gemm(entry: Any, x: torch.Tensor, rows: int, packed: torch.Tensor, out_features: int,
          bias: torch.Tensor | None) -> torch.Tensor:
    """``entry`` (a C++ GEMM: threads, x, rows, inner, ldx, packed, N, bias, y, ldy) on contiguous ``x``, into a
    new ``[..., out_features]`` tensor of ``x``'s dtype."""
    inner = x.shape[-1]
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    if rows:
        status = entry(torch.get_num_threads(), x.data_ptr(), rows, inner, inner, packed.data_ptr(), out_features,
                       None if bias is None else bias.contiguous().data_ptr(), y.data_ptr(), out_features)
        if status != 0:
            raise RuntimeError(f"{entry.__name__} returned {status}")
    return y


# Most rows of a bf16 GEMM the AMX kernel takes (two tiles of 16; csrc/amx_linear.cpp): a decode step's.
AMX_ROWS = 32


@functools.cache
def amx_available() -> bool:
    """Whether :func:`amx_linear` runs here: the library built for a CPU with AMX-TILE and AMX-BF16, and the
    tile state granted to this process by Linux."""
    lib = _library()
    if lib is None or not lib.mgrm_amx_built():
        return False
    granted = lib.mgrm_amx_enable() == 0
    if not granted:
        log.info("the kernels' AMX GEMM is built but Linux did not grant the AMX tile state: bf16 GEMMs stay "
                 "on oneDNN")
    return granted


def pack_amx_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 ``weight`` ``[out, in]`` (as ``F.linear`` takes it) laid out for :func:`amx_linear`: zero-padded
    to multiples of 32 and ordered ``[out / 32][in / 32][2][16][16][2]``, each 32 output columns' two AMX B
    tiles per 32 inputs (16 columns x 16 pairs of consecutive inputs) one after another."""
    if weight.dim() != 2 or weight.dtype is not torch.bfloat16 or weight.device.type != "cpu":
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device}: need a 2-D bf16 CPU tensor")
    out, inner = weight.shape
    rows, cols = -(-out // AMX_ROWS) * AMX_ROWS, -(-inner // AMX_ROWS) * AMX_ROWS
    padded = torch.zeros(rows, cols, dtype=torch.bfloat16)
    padded[:out, :inner] = weight.detach()
    return padded.view(rows // 32, 2, 16, cols // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def amx_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 ``x`` ``[..., in]`` of at most :data:`AMX_ROWS` rows, with the
    weight as :func:`pack_amx_weight` returned it: bf16 products summed in fp32 on AMX tiles, the bias added,
    rounded to bf16 once (as oneDNN's AMX GEMM computes it, up to summation order)."""
    lib = _library()
    if lib is None or not amx_available():
        raise RuntimeError(f"C++ AMX GEMM unavailable: {unavailable_reason() if lib is None else 'no AMX here'}")
    blocks, steps = packed.shape[:2]
    inner = x.shape[-1]
    if packed.dtype is not torch.bfloat16 or packed.shape[2:] != (2, 16, 16, 2) or not packed.is_contiguous():
        raise ValueError(f"packed weight {tuple(packed.shape)} {packed.dtype}: not from pack_amx_weight")
    if not ((blocks - 1) * 32 < out_features <= blocks * 32 and (steps - 1) * 32 < inner <= steps * 32):
        raise ValueError(f"an input of {inner} and {out_features} output features do not fit a packed weight "
                         f"{tuple(packed.shape)}")
    if x.dtype is not torch.bfloat16 or not x.is_cpu:
        raise ValueError(f"input {tuple(x.shape)} {x.dtype} on {x.device}: need bf16 on the CPU")
    rows = x.numel() // inner if inner else 0
    if rows > AMX_ROWS:
        raise ValueError(f"input of {rows} rows: the AMX GEMM takes at most {AMX_ROWS}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype is not torch.bfloat16):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype}: need bf16 [{out_features}]")
    return _gemm(lib.mgrm_amx_linear, x if x.is_contiguous() else x.contiguous(), rows, packed, out_features, bias)


# The dtypes the elementwise passes take (csrc/elementwise.cpp): each has its own entry points.
ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_input(x: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` contiguous (a copy only where it is not), after checking it is a CPU tensor of ``dtype`` (or,
    without one, of an elementwise dtype). Few checks, each cheap: a decode step of a 4-layer model calls
    the functions below 21 times (9 norms, 4 SwiGLUs, 8 RoPEs), on tens of KB each."""
    if not x.is_cpu or (x.dtype is not dtype if dtype is not None else x.dtype not in ELEMENTWISE_DTYPES):
        need = "fp32 or bf16" if dtype is None else f"{dtype} (the input's dtype)"
        raise ValueError(f"{what} {tuple(x.shape)} {x.dtype} on {x.device}: need {need} on the CPU")
    return x if x.is_contiguous() else x.contiguous()


def _entry(lib: ctypes.CDLL, name: str, dtype: torch.dtype) -> Any:
    return getattr(lib, name if dtype is torch.float32 else f"{name}_bf16")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch.nn.functional.rms_norm(x, (d,), weight, eps)`` for ``x`` ``[..., d]`` in fp32 or bf16 (the
    weight in the same dtype) in one pass per row (``csrc/elementwise.cpp``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ RMSNorm unavailable: {unavailable_reason()}")
    x = _cpu_input(x, "input")
    weight = _cpu_input(weight, "weight", x.dtype)
    dim = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != dim:
        raise ValueError(f"weight {tuple(weight.shape)} does not match an input of {dim} channels")
    y = torch.empty_like(x)
    rows = x.numel() // dim if dim else 0
    if rows and _entry(lib, "mgrm_rms_norm", x.dtype)(torch.get_num_threads(), x.data_ptr(), rows, dim, dim,
                                                       weight.data_ptr(), eps, y.data_ptr(), dim) != 0:
        raise RuntimeError(f"mgrm_rms_norm rejected an input {tuple(x.shape)}")
    return y


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :f]) * x[..., f:]`` for ``x`` ``[..., 2f]`` in fp32 or bf16 in one pass
    (``csrc/elementwise.cpp``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ SwiGLU unavailable: {unavailable_reason()}")
    x = _cpu_input(x, "input")
    f = x.shape[-1] // 2
    if x.shape[-1] != 2 * f or f == 0:
        raise ValueError(f"input {tuple(x.shape)}: the last dimension holds gate and up halves, so it must be even")
    y = x.new_empty(*x.shape[:-1], f)
    rows = x.numel() // (2 * f)
    if rows and _entry(lib, "mgrm_swiglu", x.dtype)(torch.get_num_threads(), x.data_ptr(), rows, f, 2 * f,
                                                     y.data_ptr(), f) != 0:
        raise RuntimeError(f"mgrm_swiglu rejected an input {tuple(x.shape)}")
    return y


def swiglu_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to :func:`swiglu`'s input ``x`` ``[..., 2f]`` (gate and up halves side by
    side) of ``grad`` ``[..., f]`` on its output, in one pass (``csrc/elementwise.cpp``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ SwiGLU unavailable: {unavailable_reason()}")
    x = _cpu_input(x, "input")
    grad = _cpu_input(grad, "gradient", x.dtype)
    f = x.shape[-1] // 2
    if x.shape[-1] != 2 * f or f == 0 or grad.shape != (*x.shape[:-1], f):
        raise ValueError(f"gradient {tuple(grad.shape)} does not fit a SwiGLU input {tuple(x.shape)}")
    dx = torch.empty_like(x)
    rows = x.numel() // (2 * f)
    if rows and _entry(lib, "mgrm_swiglu_backward", x.dtype)(torch.get_num_threads(), x.data_ptr(), grad.data_ptr(),
                                                              rows, f, dx.data_ptr()) != 0:
        raise RuntimeError(f"mgrm_swiglu_backward rejected an input {tuple(x.shape)}")
    return dx


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`rms_norm` with respect to ``x`` (``x``'s dtype) and ``weight`` (fp32, summed over
    the rows) for ``grad`` on its output, in two passes over each row (``csrc/elementwise.cpp``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ RMSNorm unavailable: {unavailable_reason()}")
    x = _cpu_input(x, "input")
    weight = _cpu_input(weight, "weight", x.dtype)
    grad = _cpu_input(grad, "gradient", x.dtype)
    dim = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != dim or grad.shape != x.shape:
        raise ValueError(f"weight {tuple(weight.shape)} or gradient {tuple(grad.shape)} does not fit an input "
                         f"{tuple(x.shape)}")
    dx, dw = torch.empty_like(x), torch.zeros(dim)
    rows = x.numel() // dim if dim else 0
    if rows and _entry(lib, "mgrm_rms_norm_backward", x.dtype)(
            torch.get_num_threads(), x.data_ptr(), weight.data_ptr(), grad.data_ptr(), rows, dim, eps, dx.data_ptr(),
            dw.data_ptr()) != 0:
        raise RuntimeError(f"mgrm_rms_norm_backward rejected an input {tuple(x.shape)}")
    return dx, dw


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE in one pass: ``x`` ``[b, s, h, d]`` in fp32 or bf16 (any strides, contiguous channels) with its
    first ``2 * half`` channels per head rotated by ``cos``/``sin`` ``[1 or b, s, 1, half]`` (``x``'s dtype),
    the rest copied; the result has ``x``'s layout where ``x`` is dense (``torch.empty_like``). The same
    products, sums and roundings as ``cpu_decode._rotate``'s torch ops."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C++ RoPE unavailable: {unavailable_reason()}")
    if x.dtype not in ELEMENTWISE_DTYPES or not x.is_cpu or x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"input {tuple(x.shape)} {x.dtype} on {x.device}: need fp32 or bf16 CPU [b, s, h, d], "
                         "contiguous channels")
    b, s, h, d = x.shape
    cos, sin = _cpu_input(cos, "cos", x.dtype), _cpu_input(sin, "sin", x.dtype)
    half = cos.shape[-1]
    if (cos.shape != sin.shape or cos.dim() != 4 or cos.shape[0] not in (1, b) or cos.shape[1] != s
            or cos.shape[2] != 1 or 2 * half > d):
        raise ValueError(f"angles {tuple(cos.shape)} / {tuple(sin.shape)} do not fit an input {tuple(x.shape)}")
    y = torch.empty_like(x)
    if y.stride(-1) != 1:
        y = torch.empty(x.shape, dtype=x.dtype)
    if x.numel() and _entry(lib, "mgrm_rotary", x.dtype)(
            torch.get_num_threads(), x.data_ptr(), b, s, h, d, x.stride(0), x.stride(1), x.stride(2),
            cos.data_ptr(), sin.data_ptr(), 0 if cos.shape[0] == 1 else s * half, half, half, int(interleaved),
            y.data_ptr(), y.stride(0), y.stride(1), y.stride(2)) != 0:
        raise RuntimeError(f"mgrm_rotary rejected an input {tuple(x.shape)}")
    return y


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row of fp32 or bf16 CPU ``logits`` ``[rows, n]``: ``torch.argmax``'s index (int64) and the fp32
    log-sum-exp of ``logits.float()``, in one C++ call (``csrc/elementwise.cpp``). None where the library is
    not built here, ``logits`` is of another kind, or a row holds a NaN or +inf or no finite logit: torch's
    ops decide those."""
    lib = _library()
    if (lib is None or logits.dtype not in ELEMENTWISE_DTYPES or logits.device.type != "cpu" or logits.dim() != 2
            or logits.shape[1] == 0 or logits.stride(1) != 1):
        return None
    rows, n = logits.shape
    argmax, lse = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    if rows and _entry(lib, "mgrm_row_argmax_logsumexp", logits.dtype)(
            torch.get_num_threads(), logits.data_ptr(), rows, n, max(logits.stride(0), n), argmax.data_ptr(),
            lse.data_ptr()) != 0:
        return None
    return argmax, lse


def read_probe(buffer: torch.Tensor) -> float | None:
    """The sum of a contiguous fp32 CPU ``buffer``, read on torch's threads the way that reads memory fastest
    here (``csrc/read_probe.cpp``): time it over a buffer far larger than the caches for the machine's read
    rate. None where the library is not built here."""
    lib = _library()
    if lib is None:
        return None
    if buffer.dtype != torch.float32 or buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError(f"read_probe reads a contiguous fp32 CPU tensor, not {buffer.dtype} on {buffer.device} "
                         f"(contiguous: {buffer.is_contiguous()})")
    return lib.mgrm_read_probe(torch.get_num_threads(), buffer.data_ptr(), buffer.numel())


def _cache_dir() -> Path:
    configured = os.environ.get("MEGATRON_GRM_KERNEL_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron_grm" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's flags line (Linux), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


@functools.cache
def _library_path() -> Path | None:
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    units = " ".join(f"{source.name}{''.join(defines)}" for source, defines in _compile_units())
    digest = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES + HEADERS), " ".join(FLAGS), units,
                                       compiler, version, _cpu_features(), torch.__version__]).encode()
                            ).hexdigest()[:16]
    return _cache_dir() / f"attention-{digest}.so"


@functools.cache
def _build_error() -> str | None:
    """Build the library if it is not cached yet; the reason when that is impossible or fails."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return f"{DISABLE_VARIABLE}=0"
    path = _library_path()
    if path is None:
        return "no working C++ compiler (set CXX, or install g++)"
    if path.exists():
        return None
    if _failure_record(path).exists():
        return _recorded_failure(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot write the kernel cache {path.parent}: {exc}"
    with _build_lock(path):
        if path.exists():  # built by the process this one waited for
            return None
        if _failure_record(path).exists():  # or failed there: the same sources, compiler and CPU fail again
            return _recorded_failure(path)
        return _build(path)


def _failure_record(path: Path) -> Path:
    """Beside the library's name: the compiler's errors from a build of the same sources, flags, compiler and
    CPU kind, so the other ranks and later processes report them instead of each compiling again."""
    return path.with_name(path.stem + ".failed")


def _recorded_failure(path: Path) -> str:
    record = _failure_record(path)
    try:
        reason = record.read_text().strip()
    except OSError as exc:
        reason = f"(unreadable: {exc})"
    return f"an earlier build failed here ({record}; delete it to build again): {reason}"


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One build at a time per library: the ranks of a job starting on an empty cache (or a shared home's
    nodes of one CPU kind) wait for the first one's build instead of each running the compiler. The lock
    file goes when the builder is done; a process that opens it anew then finds the library (or, after a
    failed build, builds again itself). Where the file system has no ``flock``, every process builds, as
    the rename keeps that safe."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's build of %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock here
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not a newer process's lock file
                    os.unlink(lock)
    finally:
        os.close(fd)  # releases the lock


def _compile_units() -> list[tuple[Path, tuple[str, ...]]]:
    """Each source with the defines it is compiled under: :data:`PER_DTYPE_SOURCE` once per cache dtype
    (the largest units first, so the last compilers to finish have the small ones), the others once."""
    units: list[tuple[Path, tuple[str, ...]]] = []
    for source in SOURCES:
        if source.name == PER_DTYPE_SOURCE:
            units += [(source, (f"-DMGRM_DECODE_DTYPE={code}",)) for code in DTYPE_CODES.values()]
    return units + [(source, ()) for source in SOURCES if source.name != PER_DTYPE_SOURCE]


def _build(path: Path) -> str | None:
    """Compile the units side by side (one compiler per core), link them into a scratch folder beside ``path``
    and rename the library into place."""
    compiler = _compiler()
    try:
        scratch = tempfile.mkdtemp(prefix=path.stem + ".", suffix=".build", dir=path.parent)
    except OSError as exc:
        return f"cannot write the kernel cache {path.parent}: {exc}"
    units = _compile_units()
    log.info("building the C++ kernels for this CPU into %s (once per CPU kind; %d compilers at once)", path,
             min(len(units), _cores()))
    try:
        objects = [os.path.join(scratch, f"{i}-{source.stem}.o") for i, (source, _) in enumerate(units)]

        failed = threading.Event()  # once a unit fails, the units not started yet are not compiled

        def compile_one(unit: tuple[Path, tuple[str, ...]], target: str) -> subprocess.CompletedProcess | None:
            if failed.is_set():
                return None
            source, defines = unit
            try:
                result = subprocess.run([compiler, *FLAGS, *defines, "-c", str(source), "-o", target],
                                        capture_output=True, text=True, timeout=600)
            except BaseException:
                failed.set()
                raise
            if result.returncode != 0:
                failed.set()
            return result

        with concurrent.futures.ThreadPoolExecutor(max_workers=_cores()) as pool:
            results = list(pool.map(compile_one, units, objects))
        for (source, defines), result in zip(units, results):
            if result is not None and result.returncode != 0:
                return _failed(path, f"{compiler} failed on {' '.join((str(source), *defines))}", result)
        library = os.path.join(scratch, path.name)
        result = subprocess.run([compiler, *FLAGS, *objects, "-o", library], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            return _failed(path, f"{compiler} failed linking {' '.join(map(str, SOURCES))}", result)
        os.replace(library, path)  # atomic: a concurrent build of the same sources replaces it with the same bytes
        log.info("built the C++ attention kernels: %s", path)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"building {' '.join(map(str, SOURCES))} failed: {exc}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _failed(path: Path, what: str, result: subprocess.CompletedProcess) -> str:
    """The reason a build failed; recorded beside the library when the compiler itself reported errors (exit
    status 1), which the same inputs would report again; a compiler killed or timed out is tried again."""
    reason = f"{what}: {result.stderr.strip()[-2000:]}"
    if result.returncode == 1:
        record = _failure_record(path)
        with contextlib.suppress(OSError):
            staging = record.with_name(f"{record.name}.{os.getpid()}.tmp")
            staging.write_text(reason + "\n")
            os.replace(staging, record)
    return reason


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def unavailable_reason() -> str:
    """Why the kernels' library cannot be used here (the compiler's or the loader's error), for a log line."""
    return _build_error() or _load_error() or "unknown"


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    if _build_error() is not None:
        return None, None
    try:
        lib = ctypes.CDLL(str(_library_path()))
    except OSError as exc:
        return None, f"loading {_library_path()} failed: {exc}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mgrm_decode_attention.restype = ctypes.c_int
    lib.mgrm_decode_attention_dtypes.restype = ctypes.c_int
    lib.mgrm_decode_attention_dtypes.argtypes = []
    lib.mgrm_decode_attention.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, i64, i64, i64,
                                          ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr,
                                          i64, i64, ctypes.c_float, ptr, ptr, ptr]
    lib.mgrm_prefill_attention.restype = ctypes.c_int
    lib.mgrm_prefill_attention.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, i64, i64, i64,
                                           ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64,
                                           ptr, i64, i64, i64, ptr, ctypes.c_float]
    lib.mgrm_prefill_attention_built.restype = ctypes.c_int
    lib.mgrm_prefill_attention_built.argtypes = []
    lib.mgrm_attention_simd.restype = ctypes.c_char_p
    lib.mgrm_attention_simd.argtypes = []
    lib.mgrm_linear_panel.restype = ctypes.c_int
    lib.mgrm_linear_panel.argtypes = []
    lib.linear_panel_width = lib.mgrm_linear_panel()  # read once: packed_linear checks it every call
    lib.mgrm_packed_linear.restype = ctypes.c_int
    lib.mgrm_packed_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64]
    lib.mgrm_amx_built.restype = ctypes.c_int
    lib.mgrm_amx_built.argtypes = []
    lib.mgrm_amx_enable.restype = ctypes.c_int
    lib.mgrm_amx_enable.argtypes = []
    lib.mgrm_amx_linear.restype = ctypes.c_int
    lib.mgrm_amx_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64]
    lib.mgrm_read_probe.restype = ctypes.c_float
    lib.mgrm_read_probe.argtypes = [ctypes.c_int, ptr, i64]
    for suffix in ("", "_bf16"):
        getattr(lib, "mgrm_rms_norm" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_rms_norm" + suffix).argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_float,
                                                           ptr, i64]
        getattr(lib, "mgrm_swiglu" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_swiglu" + suffix).argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64]
        getattr(lib, "mgrm_swiglu_backward" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_swiglu_backward" + suffix).argtypes = [ctypes.c_int, ptr, ptr, i64, i64, ptr]
        getattr(lib, "mgrm_rms_norm_backward" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_rms_norm_backward" + suffix).argtypes = [ctypes.c_int, ptr, ptr, ptr, i64, i64,
                                                                    ctypes.c_float, ptr, ptr]
        getattr(lib, "mgrm_rotary" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_rotary" + suffix).argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, i64, i64, i64,
                                                         ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, i64, i64, i64]
        getattr(lib, "mgrm_row_argmax_logsumexp" + suffix).restype = ctypes.c_int
        getattr(lib, "mgrm_row_argmax_logsumexp" + suffix).argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ptr]
    return lib, None


@functools.cache
def _compiled_dtypes() -> frozenset[torch.dtype]:
    lib = _library()
    if lib is None:
        return frozenset()
    bits = lib.mgrm_decode_attention_dtypes()
    return frozenset(dtype for dtype, code in DTYPE_CODES.items() if bits >> code & 1)


def _load_error() -> str | None:
    return _loaded()[1]


def _library() -> ctypes.CDLL | None:
    return _loaded()[0]
