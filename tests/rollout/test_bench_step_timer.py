"""bench/rollout.py's decode_step_timer: per forward of a model, its wall time and the time spent inside the
C++ decode attention and the oneDNN GEMMs, with both functions restored afterwards. Here the model is a
small module whose forward calls the real kernel and the real oneDNN linear, so each clock has known work."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_grm.parallel import cpu_decode_kernel, onednn_linear


class _Step(torch.nn.Module):
    """A GEMM through oneDNN's reordered weight, the decode attention over a cache, then a pause outside
    both (the "rest")."""

    def __init__(self, pause_s: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.packed = onednn_linear.reorder(torch.randn(256, 128, generator=generator), 8)
        self.keys = torch.randn(8, 2, 512, 64, generator=generator)
        self.values = torch.randn(8, 2, 512, 64, generator=generator)
        self.pause_s = pause_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = onednn_linear.linear(x, self.packed)
        queries = hidden.view(8, 2, 2, 64)
        _, _, attended = cpu_decode_kernel.attend(queries, self.keys, self.values, 0, 512, None, 0.125)
        time.sleep(self.pause_s)
        return attended


needs_both = pytest.mark.skipif(
    not (onednn_linear.available(torch.float32) and cpu_decode_kernel.available(torch.float32)),
    reason="needs this build's oneDNN linear and the C++ decode kernel")


@needs_both
def test_each_forward_splits_into_attention_linears_and_the_rest(bench):
    model = _Step(pause_s=0.02)
    x = torch.randn(8, 128)
    with torch.inference_mode(), bench.decode_step_timer(model) as steps:
        for _ in range(3):
            model(x)
    assert len(steps) == 3
    for wall, attention, linears in steps:
        assert attention > 0 and linears > 0
        assert wall >= attention + linears + 0.02  # the pause is in neither clock
        assert attention + linears < wall - 0.015


@needs_both
def test_the_functions_and_hooks_are_restored_even_after_an_error(bench):
    attend, linear = cpu_decode_kernel.attend, onednn_linear.linear
    model = _Step(pause_s=0.0)
    with pytest.raises(RuntimeError, match="stop"), bench.decode_step_timer(model) as steps:
        with torch.inference_mode():
            model(torch.randn(8, 128))
        raise RuntimeError("stop")
    assert cpu_decode_kernel.attend is attend and onednn_linear.linear is linear
    with torch.inference_mode():
        model(torch.randn(8, 128))
    assert len(steps) == 1  # the forward after the block was not recorded
