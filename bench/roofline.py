"""The least time any engine could take for a rollout on this machine: a roofline for prefill and decode.

``bench/rollout.py`` compares our engine with ``transformers.generate``. Its ratio alone does not say how
much either side leaves on the table, nor whether a target ratio is within reach at all: both sides do
the same GEMMs, and at batch 32 a decode step mostly reads the KV cache. This module measures the
machine's two rates in the bench's own process (best-of matmul FLOP/s on the prefill's GEMM shapes, and
read bandwidth) and prices the least work a rollout needs:

* prefill: every distinct prompt prefix once (rows that share a prefix need its keys and values only
  once), the linear layers and causal attention at the matmul peak; in the final layer only the keys and
  values there, and the whole layer at each row's last position (the only output a rollout reads, as
  ``rollout/last_position.py`` computes it); one logit row per row;
* decode step ``j``: every row's linear layers and LM head and its attention over ``prompt + j``
  positions, at the matmul peak, but never less than reading the weights once and each distinct cached
  position once (shared prefixes once per step, generated positions per row) at the read bandwidth.

The floor is a bound, not a model of any engine: no engine running at most at these measured rates can
beat it, so ``generate``'s time over the floor is the largest ours/HF ratio reachable for that case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_grm.models.config import ModelConfig
from megatron_grm.parallel import cpu_decode_kernel


def layer_linear_params(m: ModelConfig) -> int:
    """Weights one token meets per layer: Q, K, V, output projection, SwiGLU gate/up and down."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    return m.hidden_size * (2 * q + 2 * kv) + 3 * m.hidden_size * m.ffn_hidden_size


def kv_projection_params(m: ModelConfig) -> int:
    """The K and V weights of one layer: all a prefill's final layer needs at a position whose output
    nothing reads."""
    return m.hidden_size * 2 * m.num_query_groups * m.kv_channels


def kv_elements_per_position(m: ModelConfig) -> int:
    return m.num_layers * 2 * m.num_query_groups * m.kv_channels


def attention_flops(m: ModelConfig, keys: int, layers: int | None = None) -> int:
    """One query over ``keys`` positions in every layer (or ``layers`` of them): scores and weighted values."""
    return (m.num_layers if layers is None else layers) * 4 * keys * m.num_attention_heads * m.kv_channels


@dataclass(frozen=True)
class Floor:
    prefill_s: float
    decode_s: float
    decode_bandwidth_bound_steps: int  # steps where reading weights and cache, not FLOPs, sets the floor

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def distinct_prefixes(rows: list[list[int]]) -> list[int]:
    """The depth (0-based position) of every distinct prefix of the rows: the prompt positions a prefill
    has to compute at least once. Rows that share their first ``n`` tokens share those ``n`` prefixes."""
    nodes: dict[tuple[int, int], int] = {}  # (parent prefix, next token) -> prefix
    depths = []
    for row in rows:
        parent = -1
        for depth, token in enumerate(row):
            node = nodes.get((parent, token))
            if node is None:
                node = nodes[(parent, token)] = len(nodes)
                depths.append(depth)
            parent = node
    return depths


def rollout_floor(m: ModelConfig, rows: list[list[int]], new_tokens: int, element_bytes: int,
                  peak_flops: float, read_bytes_per_s: float) -> Floor:
    """Least wall seconds to prefill ``rows`` and decode ``new_tokens`` per row (the first from the
    prefill's logits) at ``peak_flops`` and ``read_bytes_per_s``."""
    prefixes = distinct_prefixes(rows)
    lm_head = 2 * m.vocab_size * m.hidden_size
    linear = 2 * layer_linear_params(m) * m.num_layers
    before_final = m.num_layers - 1
    final_rest = 2 * (layer_linear_params(m) - kv_projection_params(m))  # the final layer past K and V
    prefill_flops = (len(prefixes) * (2 * layer_linear_params(m) * before_final + 2 * kv_projection_params(m))
                     + sum(attention_flops(m, d + 1, before_final) for d in prefixes)
                     + sum(final_rest + attention_flops(m, len(r), 1) + lm_head for r in rows))
    weight_bytes = (layer_linear_params(m) * m.num_layers + m.vocab_size * m.hidden_size) * element_bytes
    prefill = max(prefill_flops / peak_flops, weight_bytes / read_bytes_per_s)
    decode, bound = 0.0, 0
    prompt_keys = sum(len(r) for r in rows)
    for step in range(1, new_tokens):  # the step's own token is a key too: prompt + step positions
        flops = len(rows) * (linear + lm_head) + attention_flops(m, prompt_keys + len(rows) * step)
        cache = (len(prefixes) + len(rows) * step) * kv_elements_per_position(m) * element_bytes
        compute, memory = flops / peak_flops, (weight_bytes + cache) / read_bytes_per_s
        decode += max(compute, memory)
        bound += memory > compute
    return Floor(prefill, decode, bound)


def _best_rate(fn, work: float, seconds: float) -> float:
    fn()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = max(best, work / max(time.perf_counter() - t, 1e-9))
    return best


def matmul_peak(m: ModelConfig, dtype: torch.dtype, tokens: int = 4096, seconds: float = 0.5) -> float:
    """Best-of FLOP/s over the prefill's own GEMMs (``tokens`` rows against each weight shape)."""
    best = 0.0
    for n_out, n_in in ((m.num_attention_heads * m.kv_channels, m.hidden_size),
                        (2 * m.ffn_hidden_size, m.hidden_size), (m.hidden_size, m.ffn_hidden_size)):
        x = torch.randn(tokens, n_in, dtype=dtype)
        w = torch.randn(n_out, n_in, dtype=dtype)
        best = max(best, _best_rate(lambda x=x, w=w: torch.nn.functional.linear(x, w),
                                    2 * tokens * n_in * n_out, seconds))
    return best


def read_probe_name() -> str:
    """Which read :func:`read_bandwidth` times here, for the bench's printout."""
    return "C++ read probe" if cpu_decode_kernel.available(torch.float32) else "torch's sum (no C++ kernels here)"


def read_bandwidth(megabytes: int = 1024, seconds: float = 1.0) -> float:
    """Best-of bytes/s of reading a buffer far larger than the caches: how fast memory can be read. The read
    is the C++ probe (``cpu_decode_kernel.read_probe``, several streams a thread) where the kernels build:
    torch's sum read 25 GB/s on the 2-core AVX-512 Xeon where the decode attention kernel read its cache at
    28-30 and the probe 32 (session 52), so a floor priced with torch's rate was not a floor. On a shared
    host the rate moves with the neighbours' load (34-62 GB/s within minutes on a 2-core EPYC), so the bench
    takes the best of a probe before and after its cases."""
    buffer = torch.rand(megabytes * (1 << 20) // 4, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    if cpu_decode_kernel.available(torch.float32):
        return _best_rate(lambda: cpu_decode_kernel.read_probe(buffer), buffer.numel() * 4, seconds)
    return _best_rate(buffer.sum, buffer.numel() * 4, seconds)
