"""The CPU stand-ins for flash-attn's ``apply_rotary_emb`` and ``flash_attn_with_kvcache`` (the kernels
Megatron-Core's flash-decode path calls), against Megatron's own RoPE and a naive attention loop."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grm.parallel import cpu_decode_kernel
from megatron_grm.parallel.cpu_decode import apply_rotary_emb, flash_attn_with_kvcache
from megatron_grm.rollout.shared_prefill import PrefixSegment


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def decode_path(request, monkeypatch):
    """Every test runs on both decode attentions: the C++ kernel (where this machine has a compiler; CI's
    has) and torch's matmul / fused path, which runs where the kernel cannot be built."""
    import megatron_grm.parallel.cpu_decode as cpu_decode

    if request.param == "kernel":
        if cpu_decode_kernel._compiler() is None:
            pytest.skip("no C++ compiler: the kernel path cannot run here")
        assert cpu_decode_kernel.available(torch.float32), cpu_decode_kernel.describe()
    else:
        monkeypatch.setattr(cpu_decode, "_native", lambda cache: False)
    return request.param


def _cos_sin(length: int, half: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(half, dtype=torch.float32) / half)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return freqs, freqs.cos(), freqs.sin()


def test_rotary_matches_megatrons_rope_at_offsets():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(0)
    b, s, h, d, offset = 2, 5, 3, 8, 7
    x = torch.randn(b, s, h, d, generator=g)
    freqs, cos, sin = _cos_sin(32, d // 2)
    emb = torch.cat((freqs, freqs), dim=-1)[offset:offset + s]  # Megatron's [s, 1, 1, d] frequencies
    want = _apply_rotary_pos_emb_bshd(x.transpose(0, 1), emb[:, None, None, :]).transpose(0, 1)
    got = apply_rotary_emb(x, cos, sin, False, offset)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Per-row offsets: row r rotated as if alone at its own offset.
    rows = apply_rotary_emb(x, cos, sin, False, torch.tensor([offset, 0]))
    torch.testing.assert_close(rows[0], got[0])
    torch.testing.assert_close(rows[1], apply_rotary_emb(x, cos, sin, False, 0)[1])


def test_partial_rotary_leaves_the_other_channels_alone():
    x = torch.randn(1, 3, 2, 8)
    _, cos, sin = _cos_sin(8, 2)  # rotary dim 4 of 8
    out = apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[:, 1:, :, :4], x[:, 1:, :, :4])


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (4, 2)])
def test_kvcache_attention_appends_rotated_keys_and_attends_causally(h_q, h_kv):
    g = torch.Generator().manual_seed(1)
    b, d, s_max = 3, 8, 12
    lengths = torch.tensor([4, 0, 7])  # tokens already cached per row
    k_cache, v_cache = torch.randn(b, s_max, h_kv, d, generator=g), torch.randn(b, s_max, h_kv, d, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k, v = (torch.randn(b, 1, n, d, generator=g) for n in (h_q, h_kv, h_kv))
    _, cos, sin = _cos_sin(s_max, d // 2)

    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths)

    assert out.shape == (b, 1, h_q, d)
    for r in range(b):
        n = int(lengths[r])
        k_rot = apply_rotary_emb(k[r:r + 1], cos, sin, False, n)[0, 0]
        q_rot = apply_rotary_emb(q[r:r + 1], cos, sin, False, n)[0, 0]
        torch.testing.assert_close(k_cache[r, n], k_rot)  # the new key, rotated, in its slot
        torch.testing.assert_close(v_cache[r, n], v[r, 0])
        torch.testing.assert_close(k_cache[r, :n], before_k[r, :n])  # nothing else written
        torch.testing.assert_close(k_cache[r, n + 1:], before_k[r, n + 1:])
        torch.testing.assert_close(v_cache[r, n + 1:], before_v[r, n + 1:])
        for head in range(h_q):
            kv = head // (h_q // h_kv)
            scores = k_cache[r, : n + 1, kv] @ q_rot[head] / math.sqrt(d)  # positions 0..n only
            want = scores.softmax(-1) @ v_cache[r, : n + 1, kv]
            torch.testing.assert_close(out[r, 0, head], want, atol=1e-5, rtol=0)


def test_unsupported_flash_attn_arguments_fail_loudly():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_with_kvcache(q, torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4), window_size=(2, 0))



def test_a_steps_angles_are_taken_once_for_all_its_layers_and_anew_otherwise():
    """Every layer of a decode step passes the same cos/sin tables at the same offset: the rows are sliced
    once. Another offset, other tables (even equal ones) or a rotary shift slice them again."""
    from megatron_grm.parallel import cpu_decode

    cos, sin = torch.randn(64, 8), torch.randn(64, 8)
    cpu = torch.device("cpu")
    first = cpu_decode._step_angles(cos, sin, 10, torch.float32, cpu)
    assert all(a is b for a, b in zip(cpu_decode._step_angles(cos, sin, 10, torch.float32, cpu), first))
    assert torch.equal(first[0], cos[10:11][None, :, None]) and torch.equal(first[1], sin[10:11][None, :, None])
    later = cpu_decode._step_angles(cos, sin, 11, torch.float32, cpu)
    assert torch.equal(later[0], cos[11:12][None, :, None])
    other = cpu_decode._step_angles(cos.clone() * 2, sin.clone(), 11, torch.float32, cpu)
    assert torch.equal(other[0], 2 * cos[11:12][None, :, None])
    with cpu_decode.rotary_shifted_by(torch.tensor([0, 3])):
        shifted = cpu_decode._step_angles(cos, sin, 11, torch.float32, cpu)
    assert shifted[0].shape[0] == 2 and torch.equal(shifted[0][1], cos[8:9][:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_waves_rope_tables_come_in_the_activations_dtype_once_per_length(dtype):
    """Inside a wave Megatron's RotaryEmbedding gives each length's tables once, already in the model's
    dtype: flash-decode's ``.to(query.dtype)`` then hands every layer the same tensors (a bf16 model had
    each layer convert the whole table and slice the step's angles again), with the values it converted
    before. After the wave the module computes fp32 tables again."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_grm.parallel import cpu_decode
    from megatron_grm.rollout.static_backend import _wave_rope_tables

    model = torch.nn.Module()
    model.rotary_pos_emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    model.config = SimpleNamespace(params_dtype=dtype)
    cos32, sin32 = model.rotary_pos_emb.get_cos_sin(40)
    with _wave_rope_tables(model):
        cos, sin = model.rotary_pos_emb.get_cos_sin(40)
        assert cos.dtype == sin.dtype == dtype
        assert torch.equal(cos, cos32.to(dtype)) and torch.equal(sin, sin32.to(dtype))
        again = model.rotary_pos_emb.get_cos_sin(40)
        assert again[0] is cos and again[1] is sin and cos.to(dtype) is cos  # flash-decode's .to(): no copy
        step = cpu_decode._step_angles(cos.to(dtype), sin.to(dtype), 7, dtype, torch.device("cpu"))
        layer2 = cpu_decode._step_angles(again[0].to(dtype), again[1].to(dtype), 7, dtype, torch.device("cpu"))
        assert layer2[0] is step[0] and torch.equal(step[0], cos32[7:8].to(dtype)[None, :, None])
    assert "get_cos_sin" not in model.rotary_pos_emb.__dict__
    assert model.rotary_pos_emb.get_cos_sin(40)[0].dtype == torch.float32


def test_a_rotary_shift_rotates_each_rows_query_and_key_in_its_own_frame():
    """Rows prefilled in a length group of their own had their keys rotated from the group's first position
    (rollout.alignment.length_groups): inside rotary_shifted_by a decode step rotates row r's query and new
    key at its cache slot minus shift[r], on the static step and on the general path alike, and the step
    attends as if the row's cache held those rotations."""
    from megatron_grm.parallel.cpu_decode import rotary_shifted_by

    g = torch.Generator().manual_seed(5)
    b, h, d, s_max, n = 3, 2, 8, 12, 6
    shift = torch.tensor([0, 2, 5])
    k_cache, v_cache = torch.randn(b, s_max, h, d, generator=g), torch.randn(b, s_max, h, d, generator=g)
    q, k, v = (torch.randn(b, 1, h, d, generator=g) for _ in range(3))
    _, cos, sin = _cos_sin(s_max, d // 2)
    general_cache = (k_cache.clone(), v_cache.clone())
    with rotary_shifted_by(shift):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n)
        general = flash_attn_with_kvcache(q, *general_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=torch.full((b,), n))
        # The next step (the angles are gathered once per step for all layers, never reused across steps).
        later = (k_cache.clone(), v_cache.clone())
        flash_attn_with_kvcache(q, *later, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n + 1)
    for r in range(b):
        want = apply_rotary_emb(k[r:r + 1], cos, sin, False, n + 1 - int(shift[r]))[0, 0]
        torch.testing.assert_close(later[0][r, n + 1], want)
    torch.testing.assert_close(k_cache, general_cache[0])
    torch.testing.assert_close(out, general, atol=1e-5, rtol=0)
    for r in range(b):
        angle = n - int(shift[r])
        torch.testing.assert_close(k_cache[r, n], apply_rotary_emb(k[r:r + 1], cos, sin, False, angle)[0, 0])
        q_rot = apply_rotary_emb(q[r:r + 1], cos, sin, False, angle)[0, 0]
        for head in range(h):
            scores = k_cache[r, : n + 1, head] @ q_rot[head] / math.sqrt(d)
            want = scores.softmax(-1) @ v_cache[r, : n + 1, head]
            torch.testing.assert_close(out[r, 0, head], want, atol=1e-5, rtol=0)
    # Outside the block the shift is gone: the same step rotates at the slot itself.
    plain = (k_cache.clone(), v_cache.clone())
    flash_attn_with_kvcache(q, *plain, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n)
    torch.testing.assert_close(plain[0][2, n], apply_rotary_emb(k[2:3], cos, sin, False, n)[0, 0])
    assert not torch.allclose(plain[0][2, n], k_cache[2, n])


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 2)])
def test_static_decode_step_with_one_offset_skips_padding_and_matches_the_per_row_path(h_q, h_kv):
    """Megatron's static loop passes one cache length for all rows: that fast path writes the rotated key
    at that slot and attends over the cache minus the padding positions the backend declares."""
    from megatron_grm.parallel.cpu_decode import masked_cache_positions

    g = torch.Generator().manual_seed(2)
    b, d, s_max, n = 3, 8, 12, 6
    k_cache, v_cache = torch.randn(b, s_max, h_kv, d, generator=g), torch.randn(b, s_max, h_kv, d, generator=g)
    q, k, v = (torch.randn(b, 1, heads, d, generator=g) for heads in (h_q, h_kv, h_kv))
    _, cos, sin = _cos_sin(s_max, d // 2)
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[1, :2] = True  # row 1's prompt was left-padded by 2, row 2's by 5
    padding[2, :5] = True

    per_row_cache = (k_cache.clone(), v_cache.clone())
    with masked_cache_positions(padding):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n)
        general = flash_attn_with_kvcache(q, *per_row_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=torch.full((b,), n))
    torch.testing.assert_close(k_cache, per_row_cache[0])  # same slot written, same rotation
    torch.testing.assert_close(out, general, atol=1e-5, rtol=0)
    for r in range(b):
        q_rot = apply_rotary_emb(q[r:r + 1], cos, sin, False, n)[0, 0]
        seen = ~padding[r, : n + 1]
        for head in range(h_q):
            kv = head // (h_q // h_kv)
            scores = k_cache[r, : n + 1, kv][seen] @ q_rot[head] / math.sqrt(d)
            want = scores.softmax(-1) @ v_cache[r, : n + 1, kv][seen]
            torch.testing.assert_close(out[r, 0, head], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_q,h_kv,scale", [(4, 4, None), (6, 2, 0.3)])
def test_16bit_decode_step_skips_padding_and_matches_float64(dtype, h_q, h_kv, scale):
    """A bf16/fp16 model's decode step (torch's fused CPU attention kernel over the cache in place): the new
    key written in its slot, padding hidden, each query head reading its KV group (a group's query heads
    go in as its query positions), the softmax scale kept."""
    from megatron_grm.parallel.cpu_decode import masked_cache_positions

    g = torch.Generator().manual_seed(7)
    b, d, s_max, n = 3, 16, 40, 30
    k_cache, v_cache = (torch.randn(b, s_max, h_kv, d, generator=g).to(dtype) for _ in range(2))
    q, k, v = (torch.randn(b, 1, heads, d, generator=g).to(dtype) for heads in (h_q, h_kv, h_kv))
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[1, :4] = True
    padding[2, :25] = True
    with masked_cache_positions(padding):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, softmax_scale=scale)
    assert out.shape == (b, 1, h_q, d) and out.dtype == dtype
    torch.testing.assert_close(k_cache[:, n], k[:, 0])
    torch.testing.assert_close(v_cache[:, n], v[:, 0])
    for r in range(b):
        seen = ~padding[r, : n + 1]
        for head in range(h_q):
            kv = head // (h_q // h_kv)
            keys, values = k_cache[r, : n + 1, kv][seen].double(), v_cache[r, : n + 1, kv][seen].double()
            scores = keys @ q[r, 0, head].double() * (scale if scale is not None else d ** -0.5)
            want = scores.softmax(-1) @ values
            torch.testing.assert_close(out[r, 0, head].double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (6, 2)])
def test_shared_prompt_decode_reads_each_prompt_once_and_matches_the_per_row_path(h_q, h_kv):
    """Rows holding copies of one prompt (unequal group sizes, interleaved, left padding) attend over
    that prompt's keys/values read once per decode step, plus their own generated positions."""
    from megatron_grm.parallel.cpu_decode import masked_cache_positions, shared_prompts

    g = torch.Generator().manual_seed(3)
    d, width, s_max, n = 8, 7, 14, 10  # prompt positions 0..6, generated 7..9, this step writes 10
    source = torch.tensor([0, 1, 0, 2, 0, 1])  # three prompts held by 3, 2 and 1 rows
    first = torch.tensor([0, 1, 3])
    b = len(source)
    k_cache, v_cache = torch.randn(b, s_max, h_kv, d, generator=g), torch.randn(b, s_max, h_kv, d, generator=g)
    k_cache[:, :width] = k_cache[first[source], :width]  # the prompt region of copies is a copy
    v_cache[:, :width] = v_cache[first[source], :width]
    q, k, v = (torch.randn(b, 1, heads, d, generator=g) for heads in (h_q, h_kv, h_kv))
    _, cos, sin = _cos_sin(s_max, d // 2)
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[first[source] == 1, :3] = True  # prompt 1 is the shortest: left-padded by 3
    padding[first[source] == 3, :1] = True

    per_row_cache = (k_cache.clone(), v_cache.clone())
    with masked_cache_positions(padding):
        want = flash_attn_with_kvcache(q, *per_row_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n)
        with shared_prompts([PrefixSegment(0, width, first, source)], width, min_width=0):
            got = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=torch.full((b,), n, dtype=torch.int32))
            # The prompt region is read from each prompt's first row only: other rows' copies are not used.
            k_cache[4, :width] = float("nan")
            again = flash_attn_with_kvcache(q, k_cache, v_cache, None, None, rotary_cos=cos, rotary_sin=sin,
                                            cache_seqlens=n + 1)
            prompt_only = flash_attn_with_kvcache(q, k_cache, v_cache, None, None, rotary_cos=cos,
                                                  rotary_sin=sin, cache_seqlens=width)  # nothing generated
        k_cache[4, :width] = k_cache[0, :width]
        want_prompt_only = flash_attn_with_kvcache(q, k_cache, v_cache, None, None, rotary_cos=cos, rotary_sin=sin,
                                                   cache_seqlens=width)
    torch.testing.assert_close(k_cache[:, n], per_row_cache[0][:, n])  # the new key written in the same slot
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.isfinite(again).all()
    torch.testing.assert_close(prompt_only, want_prompt_only, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_shared_prompt_decode_handles_large_values_and_an_all_padding_prompt(dtype, atol):
    """The split softmax stays within the values' range (weighted values are normalised before leaving
    fp32), and a prompt whose every key is padding contributes nothing instead of NaN."""
    from megatron_grm.parallel.cpu_decode import masked_cache_positions, shared_prompts

    g = torch.Generator().manual_seed(5)
    h_q, h_kv, d, width, s_max, n = 4, 2, 8, 300, 310, 304
    source, first = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2])
    b = len(source)
    k_cache = torch.randn(b, s_max, h_kv, d, generator=g)
    v_cache = torch.randn(b, s_max, h_kv, d, generator=g) * 100
    k_cache[:, :width], v_cache[:, :width] = k_cache[first[source], :width], v_cache[first[source], :width]
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    q = torch.randn(b, 1, h_q, d, generator=g).to(dtype)
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[2:, :width] = True  # prompt 1: nothing but padding
    with masked_cache_positions(padding):
        want = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), cache_seqlens=n)
        with shared_prompts([PrefixSegment(0, width, first, source)], width, min_width=0):
            got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=n)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got.float(), want.float(), atol=atol * 100, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefix_segments_are_read_once_per_group_and_match_the_per_row_path(dtype, atol, monkeypatch, decode_path):
    """Rows that agree on a head and, in pairs, on the next positions (an example's shuffled orders): each
    halving segment is read once per group, the rest per row, merged into the per-row path's result
    (16-bit: each part through the fused kernel with its log-sum-exp, checked against float64)."""
    import megatron_grm.parallel.cpu_decode as cpu_decode
    from megatron_grm.parallel.cpu_decode import masked_cache_positions, shared_prompts

    fused_parts = []  # calls of whichever part kernel runs: the C++ kernel, else torch's fused one
    name, module = ("attend", cpu_decode_kernel) if decode_path == "kernel" else ("_fused_part", cpu_decode)
    real_part = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: fused_parts.append(1) or real_part(*a, **k))

    g = torch.Generator().manual_seed(6)
    h_q, h_kv, d, width, s_max, n = 4, 2, 8, 12, 20, 15
    heads, middles = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    segments = [PrefixSegment(0, 4, torch.tensor([0, 4]), heads), PrefixSegment(4, 8, torch.tensor([0, 2, 4]), middles),
                PrefixSegment(8, 12, torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0, 1, 2, 2, 3, 4]))]
    b = len(heads)
    k_cache, v_cache = torch.randn(b, s_max, h_kv, d, generator=g), torch.randn(b, s_max, h_kv, d, generator=g)
    for seg in segments:
        for cache in (k_cache, v_cache):
            cache[:, seg.start:seg.end] = cache[seg.first[seg.source], seg.start:seg.end]
    q = torch.randn(b, 1, h_q, d, generator=g)
    k_cache, v_cache, q = k_cache.to(dtype), v_cache.to(dtype), q.to(dtype)
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[4:, :10] = True  # rows 4 and 5: shorter prompts, all padding in the middle segment and past it
    exact = torch.empty(b, h_q, d, dtype=torch.float64)
    for r in range(b):
        seen = ~padding[r, :n]
        for head in range(h_q):
            kv = head // (h_q // h_kv)
            scores = k_cache[r, :n, kv][seen].double() @ q[r, 0, head].double() / math.sqrt(d)
            exact[r, head] = scores.softmax(-1) @ v_cache[r, :n, kv][seen].double()
    with masked_cache_positions(padding):
        want = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), cache_seqlens=n)
        per_row_parts = len(fused_parts)
        fused_parts.clear()
        k_cache[1, :8] = v_cache[3, 4:8] = float("nan")  # shared positions of rows that are not a group's first
        with shared_prompts(segments, width, min_width=0):
            got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=n)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    torch.testing.assert_close(got[:, 0].double(), exact, atol=atol, rtol=0)
    # The C++ kernel (any dtype), or torch's fused kernel (16-bit), reads the whole cache per row as one
    # part, and with shared prompts both segments and the per-row rest; torch's fp32 path keeps the matmuls.
    torch_fp32 = decode_path == "torch" and dtype == torch.float32
    assert (per_row_parts, len(fused_parts)) == ((0, 0) if torch_fp32 else (1, 3))


def test_shared_prompts_below_the_threshold_keep_the_per_row_path():
    import megatron_grm.parallel.cpu_decode as cpu_decode

    first, source = torch.tensor([0]), torch.tensor([0, 0])
    short = cpu_decode.SHARED_PROMPT_MIN_WIDTH - 1
    with cpu_decode.shared_prompts([PrefixSegment(0, short, first, source)], short):
        assert cpu_decode._shared_prompts is None
    wide = cpu_decode.SHARED_PROMPT_MIN_WIDTH
    with cpu_decode.shared_prompts([PrefixSegment(0, wide, first, source)], wide):
        assert cpu_decode._shared_prompts is not None
    assert cpu_decode._shared_prompts is None
    # Segments that do not halve the rows are read per row, and so is everything after them.
    pairs, alone = (torch.tensor([0, 2]), torch.tensor([0, 0, 1, 1])), (torch.arange(4), torch.arange(4))
    segments = [PrefixSegment(0, 300, *pairs), PrefixSegment(300, 400, *alone), PrefixSegment(400, 500, *pairs)]
    with cpu_decode.shared_prompts(segments, 500):
        assert [(seg.start, seg.end) for seg in cpu_decode._shared_prompts.segments] == [(0, 300)]
    with cpu_decode.shared_prompts(segments[1:], 500):
        assert cpu_decode._shared_prompts is None
    # One group of 5 rows and 3 alone: halves 8 rows, but stacked to 4 x 5 slots it would take 20 > 16.
    skewed = PrefixSegment(0, 300, torch.tensor([0, 5, 6, 7]), torch.tensor([0, 0, 0, 0, 0, 1, 2, 3]))
    with cpu_decode.shared_prompts([skewed], 300):
        assert cpu_decode._shared_prompts is None


def test_a_per_row_tensor_of_one_cache_length_takes_the_static_decode_step():
    """Megatron's static loop hands flash-decode ``cache_seqlens`` as a [rows] tensor of one value."""
    from megatron_grm.parallel.cpu_decode import _as_int

    assert _as_int(torch.tensor([5, 5, 5], dtype=torch.int32)) == 5
    assert _as_int(torch.tensor([7])) == 7 and _as_int(3) == 3
    assert _as_int(torch.tensor([5, 6, 5])) is None


def test_head_major_decode_cache_gives_the_same_steps_and_keeps_megatrons_cache_complete():
    """contiguous_decode_cache: decode steps attend over a [rows, heads, positions, dim] copy made at the
    first step; several steps give the outputs of reading Megatron's cache directly, which is still written."""
    from megatron_grm.parallel.cpu_decode import contiguous_decode_cache, masked_cache_positions

    g = torch.Generator().manual_seed(4)
    b, h_q, h_kv, d, s_max, n, steps = 3, 4, 2, 8, 16, 6, 4
    k_cache, v_cache = torch.randn(b, s_max, h_kv, d, generator=g), torch.randn(b, s_max, h_kv, d, generator=g)
    direct = (k_cache.clone(), v_cache.clone())
    inputs = [[torch.randn(b, 1, heads, d, generator=g) for heads in (h_q, h_kv, h_kv)] for _ in range(steps)]
    _, cos, sin = _cos_sin(s_max, d // 2)
    padding = torch.zeros(b, s_max, dtype=torch.bool)
    padding[2, :3] = True
    with masked_cache_positions(padding):
        want = [flash_attn_with_kvcache(q, *direct, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=n + i)
                for i, (q, k, v) in enumerate(inputs)]
        with contiguous_decode_cache():
            for i, (q, k, v) in enumerate(inputs):
                got = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                              cache_seqlens=torch.full((b,), n + i, dtype=torch.int32))
                torch.testing.assert_close(got, want[i], atol=1e-5, rtol=0)
                if i == 0:  # later steps read the copy, not Megatron's cache
                    saved = k_cache[:, 1].clone()
                    k_cache[:, 1] = float("nan")
    k_cache[:, 1] = saved
    torch.testing.assert_close(k_cache, direct[0])  # Megatron's cache holds every step's key too
    torch.testing.assert_close(v_cache, direct[1])


def test_a_cache_laid_out_head_major_is_read_in_place_and_waves_allocate_it_so():
    """contiguous_decode_cache: Megatron's static caches allocated inside it are [positions, rows, heads, dim]
    views of [rows, heads, positions, dim] memory; decode steps over such a cache give the outputs of the
    plain layout's, write each step's key and value into it, and make no head-major copy."""
    from types import SimpleNamespace

    from megatron.core.transformer.attention import Attention

    from megatron_grm.parallel import cpu_decode
    from megatron_grm.parallel.cpu_decode import contiguous_decode_cache, head_major_kv, is_head_major

    g = torch.Generator().manual_seed(5)
    b, h_q, h_kv, d, s_max, n, steps = 3, 4, 2, 8, 16, 6, 4
    plain = [torch.randn(s_max, b, h_kv, d, generator=g) for _ in range(2)]  # Megatron's [s, b, h, d]
    laid_out = [head_major_kv(s_max, b, h_kv, d, torch.float32) for _ in range(2)]
    for dst, src in zip(laid_out, plain):
        dst.copy_(src)
    assert all(is_head_major(t) for t in laid_out) and not any(is_head_major(t) for t in plain)
    inputs = [[torch.randn(b, 1, heads, d, generator=g) for heads in (h_q, h_kv, h_kv)] for _ in range(steps)]
    _, cos, sin = _cos_sin(s_max, d // 2)
    # flash_decode hands the caches over as [b, s, h, d]
    want = [flash_attn_with_kvcache(q, *(t.permute(1, 0, 2, 3) for t in plain), k, v, rotary_cos=cos,
                                    rotary_sin=sin, cache_seqlens=n + i) for i, (q, k, v) in enumerate(inputs)]
    original = Attention.__dict__["_allocate_memory"]
    with contiguous_decode_cache():
        allocated = Attention._allocate_memory(SimpleNamespace(num_query_groups_per_partition=h_kv), s_max, b, d,
                                               torch.float32)
        assert allocated.shape == (s_max, b, h_kv, d) and is_head_major(allocated)
        for i, (q, k, v) in enumerate(inputs):
            got = flash_attn_with_kvcache(q, *(t.permute(1, 0, 2, 3) for t in laid_out), k, v, rotary_cos=cos,
                                          rotary_sin=sin, cache_seqlens=torch.full((b,), n + i, dtype=torch.int32))
            torch.testing.assert_close(got, want[i], atol=1e-5, rtol=0)
        assert cpu_decode._head_major == {}  # read in place: no copy
    assert Attention.__dict__["_allocate_memory"] is original
    for mine, theirs in zip(laid_out, plain):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)  # every step's key and value written


def test_kv_cache_helpers_keep_each_layout():
    """kv_cache_like (the wave cache length groups are copied into) and kv_cache_rows (an example's rows
    expanded from a shared prefill) keep a head-major cache head-major and Megatron's plain one plain."""
    from megatron_grm.parallel.cpu_decode import head_major_kv, is_head_major, kv_cache_like, kv_cache_rows

    g = torch.Generator().manual_seed(6)
    plain = torch.randn(10, 3, 2, 4, generator=g)
    laid_out = head_major_kv(10, 3, 2, 4, torch.float32)
    laid_out.copy_(plain)
    source = torch.tensor([2, 0, 2, 1])
    for cache in (plain, laid_out):
        like = kv_cache_like(cache, 12, 5)
        assert like.shape == (12, 5, 2, 4) and is_head_major(like) == is_head_major(cache)
        assert (like == 0).all()
        rows = kv_cache_rows(cache, source)
        assert rows.shape == (10, 4, 2, 4) and is_head_major(rows) == is_head_major(cache)
        torch.testing.assert_close(rows, plain[:, source], atol=0, rtol=0)
