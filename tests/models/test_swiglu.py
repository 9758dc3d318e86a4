"""models/swiglu.py: the local spec's SwiGLU on CPU computes what Megatron's chunk + silu * up computes. Its
torch path here (bit-identical to Megatron's); the C++ passes it takes where they are built:
tests/train/test_elementwise_autograd.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_grm.models.swiglu import SwiGLU, swiglu
from megatron_grm.parallel import elementwise_autograd


def _megatron_glu(x: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's MLP without the fused kernel (mlp.py, ``glu``)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_megatrons_unfused_glu(dtype, monkeypatch):
    monkeypatch.setattr(elementwise_autograd, "takes", lambda x, weight=None: False)  # torch's ops
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 3, 2 * 48, generator=g) * 3).to(dtype)
    grad = torch.randn(7, 3, 48, generator=g).to(dtype)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, want = swiglu(ours), _megatron_glu(theirs)
    out.backward(grad)
    want.backward(grad)
    assert out.shape == (7, 3, 48) and out.dtype == dtype
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=tol, atol=tol)
    assert ours.grad[..., :48].abs().sum() > 0 and ours.grad[..., 48:].abs().sum() > 0  # both halves written


def test_gradcheck_in_double_precision():
    x = torch.randn(4, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x,))


def test_module_takes_megatrons_config_argument():
    module = SwiGLU(config=object())
    assert list(module.parameters()) == [] and module.sharded_state_dict("mlp.activation_func.") == {}
    assert module(torch.ones(2, 4)).shape == (2, 2)
