"""parallel/multi_tensor.py: the optimizer's multi-tensor ops on torch foreach ops when apex/TE are absent.

Megatron-Core then falls back to per-tensor loops (a temporary per scaled tensor; a host read per tensor
for the gradient norm). These tests hold ours to Megatron's fallbacks bit for bit, check that they write
into the destination storage, and that Megatron's own gradient norm and clipping go through them in a
process where ``init_parallel`` installed them.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from megatron.core.utils import local_multi_tensor_scale

from megatron_grm.parallel.multi_tensor import multi_tensor_l2norm, multi_tensor_scale
from tests.conftest import python_json


def _tensors(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in [(64, 32), (32,), (7, 5)]]


@pytest.mark.parametrize("scale", [0.37, 1.0])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
def test_scales_like_megatrons_fallback_into_the_destination_storage(dst_dtype, scale):
    src = _tensors(0)
    ours, megatron = _tensors(1, dst_dtype), _tensors(1, dst_dtype)
    pointers = [t.data_ptr() for t in ours]
    noop = torch.zeros(1, dtype=torch.int)
    multi_tensor_scale(2048, noop, [src, ours], scale)
    local_multi_tensor_scale(2048, noop, [src, megatron], scale)
    for a, b in zip(ours, megatron):
        assert a.dtype == dst_dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [t.data_ptr() for t in ours] == pointers


def test_scales_a_list_in_place_when_source_and_destination_are_the_same():
    grads, expected = _tensors(2), [t * 0.25 for t in _tensors(2)]
    pointers = [t.data_ptr() for t in grads]
    multi_tensor_scale(2048, torch.zeros(1, dtype=torch.int), [grads, grads], 0.25)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [t.data_ptr() for t in grads] == pointers


def test_the_l2_norm_equals_megatrons_fallback_and_gives_per_tensor_norms():
    grads = [t * 3 for t in _tensors(3)]
    noop = torch.zeros(1, dtype=torch.int)
    ours, per_tensor = multi_tensor_l2norm(2048, noop, [grads], True)
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in grads]), rtol=0, atol=0)
    # local_multi_tensor_l2_norm's arithmetic (it puts its result on "cuda", so it is not called here)
    megatron = torch.norm(torch.tensor([torch.norm(t) for t in grads]))
    assert ours.item() == float(megatron)
    assert multi_tensor_l2norm(2048, noop, [grads], False)[1] is None


_CLIP_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from megatron_grm.parallel import ParallelLayout, init_parallel
    from megatron_grm.parallel import multi_tensor
    init_parallel(ParallelLayout())
    from megatron.core.optimizer import clip_grads, optimizer
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 200), (200,), (9, 4)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    pointers = [p.grad.data_ptr() for p in params]
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    norm = clip_grads.get_grad_norm_fp32([p.grad for p in params],
                                         grad_stats_parallel_group=torch.distributed.group.WORLD)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    print(json.dumps({
        "norm": norm, "want": want, "after": after,
        "same_storage": pointers == [p.grad.data_ptr() for p in params],
        "uses_ours": [clip_grads.multi_tensor_scale_impl is multi_tensor.multi_tensor_scale,
                      optimizer.multi_tensor_scale_impl is multi_tensor.multi_tensor_scale,
                      clip_grads.l2_norm_impl is multi_tensor.multi_tensor_l2norm],
        "installed_again": multi_tensor.install(),
    }))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU process; the GPU tests run the same ops in the Trainer")
def test_megatrons_grad_norm_and_clipping_go_through_ours_after_init_parallel():
    report = python_json(_CLIP_SCRIPT)
    assert report["uses_ours"] == [True, True, True]
    assert report["installed_again"] == []  # idempotent
    assert report["want"] > 10
    assert report["norm"] == pytest.approx(report["want"], rel=1e-6)
    assert report["after"] == pytest.approx(1.0, rel=1e-5)
    assert report["same_storage"]
