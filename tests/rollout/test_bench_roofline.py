"""bench/roofline.py: the least time any engine could take for a rollout, which bench/rollout.py prints next
to both sides' times (so a target ratio can be judged against what the machine allows)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from megatron_grm.models.config import ModelConfig

ROOFLINE = Path(__file__).resolve().parents[2] / "bench" / "roofline.py"


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("bench_roofline", ROOFLINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module's entry
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_rows_share_the_prefixes_they_agree_on_and_nothing_after(roofline):
    assert sorted(roofline.distinct_prefixes([[1, 2, 3], [1, 2, 4], [5, 6]])) == [0, 0, 1, 1, 2, 2]
    # the same tokens in another order (shuffled response blocks) share only the common head
    assert sorted(roofline.distinct_prefixes([[7, 1, 2], [7, 2, 1]])) == [0, 1, 1, 2, 2]
    assert roofline.distinct_prefixes([[3, 4]] * 8) == [0, 1]  # copies of one prompt: prefilled once
    assert roofline.distinct_prefixes([[3, 4], [4, 3]]) == [0, 1, 0, 1]  # same token, other position


def test_a_tiny_model_costs_what_counting_by_hand_gives(roofline):
    # hidden 4, 2 heads of 2, 1 KV head, ffn 8, vocab 10, one layer:
    # Q 4x4 + K 4x2 + V 4x2 + O 4x4 = 48, SwiGLU 3x4x8 = 96 -> 144 linear weights, 288 FLOPs per token;
    # LM head 2x10x4 = 80 FLOPs per logit row; attention 4 x keys x 2 heads x 2 = 16 FLOPs per key.
    shape = ModelConfig(hidden_size=4, num_layers=1, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=8,
                        vocab_size=10)
    assert roofline.layer_linear_params(shape) == 144
    rows = [[1, 2], [1, 3]]  # prefixes at depths 0, 1, 1
    # prefill (the one layer is the final one): K and V (16 weights) at 3 prefixes 3 x 32, the rest of the
    # layer (128 weights) and attention over 2 keys at each row's last position 2 x (256 + 32), 2 logit rows
    # 2 x 80: 832 FLOPs; decode step 1: 2 x (288 + 80) + 16 x (4 + 2) = 832,
    # step 2: 736 + 16 x (4 + 4) = 864 (of 3 new tokens the prefill's logits give the first, steps 1-2 the rest).
    fast_memory = roofline.rollout_floor(shape, rows, new_tokens=3, element_bytes=4, peak_flops=1000.0,
                                         read_bytes_per_s=1e12)
    assert roofline.kv_projection_params(shape) == 16
    assert fast_memory.prefill_s == pytest.approx(0.832)
    assert fast_memory.decode_s == pytest.approx(1.696)
    assert fast_memory.decode_bandwidth_bound_steps == 0
    # weights (144 + 40) x 4 = 736 bytes; the cache 3 prompt prefixes + 2 rows x step, 4 elements each, 4 bytes:
    # step 1 736 + 80, step 2 736 + 112 bytes.
    slow_memory = roofline.rollout_floor(shape, rows, new_tokens=3, element_bytes=4, peak_flops=1000.0,
                                         read_bytes_per_s=100.0)
    assert slow_memory.decode_s == pytest.approx(8.16 + 8.48)
    assert slow_memory.decode_bandwidth_bound_steps == 2
    assert slow_memory.prefill_s == pytest.approx(7.36)  # reading the weights once outlasts 832 FLOPs
    assert slow_memory.total_s == pytest.approx(7.36 + 16.64)


def test_copies_of_a_prompt_cost_one_prefill_but_every_row_decodes(roofline):
    shape = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                        vocab_size=100)
    prompt = list(range(3, 43))
    one = roofline.rollout_floor(shape, [prompt], 5, 4, 1e9, 1e15)
    eight = roofline.rollout_floor(shape, [prompt] * 8, 5, 4, 1e9, 1e15)
    # Per extra row only its logit row (2 x 100 x 64) and the final layer at its last position: the
    # weights past K and V (64 x (2 x 64 + 2 x 32) + 3 x 64 x 128 - 64 x 64 = 32768, twice) and one query
    # over its 40 keys (4 x 40 x 4 heads x 16).
    per_row = (2 * 100 * 64 + 2 * 32768 + 4 * 40 * 4 * 16) / 1e9
    assert eight.prefill_s - one.prefill_s == pytest.approx(7 * per_row)
    assert eight.decode_s == pytest.approx(8 * one.decode_s)  # compute-bound: every row's own work


def test_the_read_rate_is_timed_with_the_cpp_probe_where_the_kernels_build(roofline, monkeypatch):
    """torch's sum reads ~25% slower than the machine can (session 52), so the floor's read rate comes from
    the C++ probe where the kernels build, and from torch's sum, named as such, where they do not."""
    import torch

    from megatron_grm.parallel import cpu_decode_kernel

    read, sizes = cpu_decode_kernel.read_probe, []
    monkeypatch.setattr(cpu_decode_kernel, "read_probe", lambda buffer: sizes.append(buffer.numel()) or read(buffer))
    rate = roofline.read_bandwidth(megabytes=4, seconds=0.01)
    assert 1e8 < rate < 1e13  # bytes/s, not GB/s or seconds
    if cpu_decode_kernel.available(torch.float32):
        assert sizes and set(sizes) == {1 << 20} and roofline.read_probe_name() == "C++ read probe"
    else:
        assert not sizes
    monkeypatch.setattr(cpu_decode_kernel, "available", lambda dtype: False)
    sizes.clear()
    assert roofline.read_bandwidth(megabytes=4, seconds=0.01) > 1e8 and not sizes
    assert "torch's sum" in roofline.read_probe_name()
