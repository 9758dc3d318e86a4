"""Resolve oneMKL's vector-math kernels on one thread before torch's intra-op threads call them at once.

torch's CPU build sends contiguous fp32/fp64 ``cos``, ``sin``, ``exp``, ``log``, ``sqrt``, ``tanh``, ``erf`` and a
few more to MKL's vector math (VML, ``aten/src/ATen/cpu/vml.h``), each intra-op thread on its own chunk, at
high accuracy (``VML_HA``). oneMKL 2024.2, the version torch 2.13's wheels link, picks each VML function's
kernel on its first call; when that first call runs on two threads at once, one of them can run a
low-accuracy kernel over its whole chunk (pytorch/pytorch#188792, open; the fix proposed upstream warms
each function up, as here). Measured on this project's 2-core Xeon (session 53): the first RoPE table of a
rollout process (``cos`` of ``[1456, 32]`` angles up to ~1,450 rad) came back with 23,003-23,008 of its 46,592
entries off by up to 1.5e-4 in 3-5 of 8 processes, and that wave's log-probabilities 5e-3 away from the
training forward's (5.8e-4 otherwise), its greedy tokens different in 14 of 32 rows; a fresh process's first
``cos`` after a matmul came back wrong in 2 of 16. Later calls are right, so it looked like a first-rollout
heisenbug.

:func:`resolve_vml_dispatch` calls every VML-backed op once on a one-element tensor of each dtype: one
element runs on the calling thread alone, so each kernel is chosen there, before any parallel call.
:func:`megatron_grm.parallel.init_parallel` calls it first thing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# The ops aten/src/ATen/cpu/vml.h maps to MKL (IMPLEMENT_VML_MKL, torch 2.13), by their torch names.
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
           "tan", "tanh", "trunc")

_resolved = False


def resolve_vml_dispatch() -> bool:
    """Call each MKL-backed unary op once, single-threaded, in fp32 and fp64; returns whether it did (once per
    process; False where torch has no MKL)."""
    global _resolved
    if _resolved:
        return True
    if not torch.backends.mkl.is_available():
        return False
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            one = torch.full((1,), 0.5, dtype=dtype)  # inside every op's domain (acos, erfinv, log, ...)
            for name in VML_OPS:
                getattr(torch, name)(one)
    _resolved = True
    log.debug("oneMKL VML kernels resolved on one thread (%d ops, fp32 and fp64)", len(VML_OPS))
    return True
