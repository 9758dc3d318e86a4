"""parallel/fused_adam.py: Megatron's torch-AdamW fallback switched to torch's fused kernel.

These tests hold the torch optimizers the way Megatron's wrappers do (``.optimizer``, ChainedOptimizer's
``.chained_optimizers``) without building Megatron's, whose constructors need the CPU compatibility layer
that this pytest process does not install. The Trainer with Megatron's real optimizer is covered by
tests/train/test_parallel_equivalence.py (fused vs foreach training) and test_checkpointing.py (resume).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from megatron_grm.parallel.fused_adam import inner_torch_optimizers, use_fused_adam


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(64, 32), (32,), (7, 5)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def _megatron_fp32(inner: torch.optim.Optimizer) -> SimpleNamespace:
    """Megatron's FP32Optimizer / Float16OptimizerWithFloat16Params / DistributedOptimizer keep the torch
    optimizer as ``.optimizer``."""
    return SimpleNamespace(optimizer=inner)


def _adamw(params, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


def test_switches_the_torch_adam_inside_megatron_optimizers_and_matches_foreach():
    fused_params, foreach_params = _params(0), _params(0)
    parts = [_megatron_fp32(_adamw(fused_params[:2])), _megatron_fp32(_adamw(fused_params[2:]))]
    chained = SimpleNamespace(chained_optimizers=parts)
    assert len(inner_torch_optimizers(chained)) == 2
    assert use_fused_adam(chained) == 2
    assert all(g["fused"] is True and g["foreach"] is False
               for opt in inner_torch_optimizers(chained) for g in opt.param_groups)

    reference = _adamw(foreach_params, foreach=True)
    for _ in range(3):
        for opt in inner_torch_optimizers(chained):
            opt.step()
        reference.step()
    for got, want, start in zip(fused_params, foreach_params, _params(0)):
        assert (got - start).abs().max() > 1e-3  # three real updates happened
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_foreach_checkpoint_loaded_afterwards_does_not_switch_it_back():
    saved = _adamw(_params(1), foreach=True)
    saved.step()
    state = copy.deepcopy(saved.state_dict())
    assert state["param_groups"][0]["foreach"] is True and not state["param_groups"][0]["fused"]

    megatron_opt = _megatron_fp32(_adamw(_params(1)))
    use_fused_adam(megatron_opt)
    megatron_opt.optimizer.load_state_dict(state)
    group = megatron_opt.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is False
    megatron_opt.optimizer.step()  # the restored per-param step counters work with the fused kernel
    assert all(float(s["step"]) == 2.0 for s in megatron_opt.optimizer.state.values())


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, differentiable=True),
])
def test_other_optimizers_are_left_alone(make):
    opt = _megatron_fp32(make(_params(2)))
    before = copy.deepcopy(opt.optimizer.param_groups[0])
    assert use_fused_adam(opt) == 0
    after = opt.optimizer.param_groups[0]
    assert {k: v for k, v in after.items() if k != "params"} == {k: v for k, v in before.items() if k != "params"}
