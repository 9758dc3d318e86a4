"""parallel/paged_attention.py: the dynamic engine's attention over its paged KV cache in torch (for a GPU
without flash-attn), against attention written out per request and query in float64."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grm.parallel.paged_attention import paged_attention

BLOCK = 4


def _reference(q, k_cache, v_cache, q_lengths, kv_lengths, tables, scale):
    """Per request and query: softmax over the keys at or before the query's absolute position."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    group = q.shape[1] // k_cache.shape[2]
    for q_len, kv_len, table in zip(q_lengths, kv_lengths, tables):
        if q_len == 0:  # a padding request
            continue
        keys = torch.cat([k_cache[b] for b in table]).double()[:kv_len]  # [kv_len, kv_heads, dim]
        values = torch.cat([v_cache[b] for b in table]).double()[:kv_len]
        for j in range(q_len):
            position = kv_len - q_len + j
            for h in range(q.shape[1]):
                logits = keys[:position + 1, h // group] @ q[row, h].double() * scale
                out[row, h] = torch.softmax(logits, 0) @ values[:position + 1, h // group]
            row += 1
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("max_scores,bounds", [(1 << 28, None), (1, None), (1 << 28, (7, 12))],
                         ids=["one_call", "one_request_per_call", "host_bounds"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_matches_attention_written_out_per_request(device, mode, heads, kv_heads, max_scores, bounds):
    g = torch.Generator().manual_seed(0)
    dim, blocks = 8, 12
    k_cache = torch.randn(blocks, BLOCK, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks, BLOCK, kv_heads, dim, generator=g)
    if mode == "prefill":  # a fresh prompt, a chunk after 5 cached tokens, a one-token step; then a padding request
        q_lengths, kv_lengths = [6, 3, 1, 0], [6, 8, 9, 0]
    else:  # one new token each, caches of different lengths (a page boundary, a single token)
        q_lengths, kv_lengths = [1, 1, 1, 0], [4, 9, 1, 0]
    # Pages out of order and shared by no two requests; -1 fills a request's unused table entries.
    tables = [[7, 2], [0, 5, 3], [11, 9, 4], []]
    width = 3
    block_table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    tokens = sum(q_lengths) + 2  # two padding rows past the last request
    q = torch.randn(tokens, heads, dim, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(q_lengths).cumsum(0)), dtype=torch.int32)
    scale = 1 / math.sqrt(dim)

    got = paged_attention(*(t.to(device) for t in (q, k_cache, v_cache, cu, torch.tensor(kv_lengths, dtype=torch.int32),
                                                    block_table)), scale, max_scores, bounds).cpu()
    want = _reference(q, k_cache, v_cache, q_lengths, kv_lengths, [t[:math.ceil(n / BLOCK)] for t, n in
                                                                   zip(tables, kv_lengths)], scale)
    assert got.shape == q.shape and got.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[sum(q_lengths):] == 0).all()  # padding rows


def test_bf16_keeps_its_dtype_and_stays_close():
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(6, BLOCK, 2, 16, generator=g) for _ in range(2))
    q = torch.randn(5, 4, 16, generator=g)
    cu, kv = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([7, 2], dtype=torch.int32)
    table = torch.tensor([[4, 1], [0, -1]], dtype=torch.int32)
    exact = paged_attention(q, k_cache, v_cache, cu, kv, table, 0.25)
    low = paged_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), cu, kv, table, 0.25)
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() < 0.05


def test_megatrons_decode_call_needs_no_device_read_and_matches():
    """``Attention.flash_decode_and_prefill``'s decode step bounds the lengths on the host (1 query, the block
    table's span) instead of reading them from the device; same result as the exact lengths."""
    from types import SimpleNamespace

    from megatron_grm.parallel.paged_attention import _decode_and_prefill

    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = (torch.randn(8, BLOCK, 2, 8, generator=g) for _ in range(2))
    q = torch.randn(3, 1, 4, 8, generator=g)  # two requests decoding, one padding row
    cu, kv = torch.tensor([0, 1, 2, 2], dtype=torch.int32), torch.tensor([6, 3, 0], dtype=torch.int32)
    table = torch.tensor([[5, 2, -1], [7, -1, -1], [-1, -1, -1]], dtype=torch.int32)
    layer = SimpleNamespace(training=False, softmax_scale=None)
    got = _decode_and_prefill(layer, q, k_cache, v_cache, 1, 12, cu, None, kv, table, is_decode_only=True)
    want = paged_attention(q[:, 0], k_cache, v_cache, cu, kv, table, 8 ** -0.5)
    assert got.shape == q.shape
    torch.testing.assert_close(got[:, 0], want, rtol=0, atol=1e-6)
    assert (got[2] == 0).all() and got[:2].abs().sum() > 0
