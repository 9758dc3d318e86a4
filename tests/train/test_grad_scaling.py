"""parallel/cpu_compat.py: Megatron's gradient clipping and main-to-model copies scale in place on CPU.

Without apex/TE, Megatron-Core falls back to ``dst.copy_(src * scale)`` (a temporary per tensor). The
CPU layer swaps in :func:`multi_tensor_scale_in_place`; these tests hold it to Megatron's results and
check, in a process with the layer installed, that Megatron's own ``clip_grad_by_total_norm_fp32``
goes through it and leaves the gradients where they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from megatron.core.utils import local_multi_tensor_scale

from megatron_grm.parallel.cpu_compat import multi_tensor_scale_in_place


def _tensors(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in [(64, 32), (32,), (7, 5)]]


@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
def test_scales_like_megatrons_fallback_into_the_destination_storage(dst_dtype):
    src = _tensors(0)
    ours, megatron = _tensors(1, dst_dtype), _tensors(1, dst_dtype)
    pointers = [t.data_ptr() for t in ours]
    noop = torch.zeros(1, dtype=torch.int)
    multi_tensor_scale_in_place(2048, noop, [src, ours], 0.37)
    local_multi_tensor_scale(2048, noop, [src, megatron], 0.37)
    for a, b in zip(ours, megatron):
        assert a.dtype == dst_dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [t.data_ptr() for t in ours] == pointers


def test_scales_a_list_in_place_when_source_and_destination_are_the_same():
    grads, expected = _tensors(2), [t * 0.25 for t in _tensors(2)]
    multi_tensor_scale_in_place(2048, torch.zeros(1, dtype=torch.int), [grads, grads], 0.25)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_CLIP_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from megatron_grm.parallel.cpu_compat import apply_cpu_compat, multi_tensor_scale_in_place
    apply_cpu_compat()
    from megatron.core.optimizer import clip_grads, optimizer
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 200), (200,), (9, 4)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    pointers = [p.grad.data_ptr() for p in params]
    before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=before)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    print(json.dumps({
        "before": before, "after": after,
        "same_storage": pointers == [p.grad.data_ptr() for p in params],
        "clip_uses_ours": clip_grads.multi_tensor_scale_impl is multi_tensor_scale_in_place,
        "optimizer_uses_ours": optimizer.multi_tensor_scale_impl is multi_tensor_scale_in_place,
    }))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compatibility layer is installed only without CUDA")
def test_megatrons_clipping_scales_the_gradients_in_place_through_the_cpu_layer():
    out = subprocess.run([sys.executable, "-c", _CLIP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["clip_uses_ours"] and report["optimizer_uses_ours"]
    assert report["before"] > 10
    assert report["after"] == pytest.approx(1.0, rel=1e-5)
    assert report["same_storage"]
