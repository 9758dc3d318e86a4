"""The C++ RMSNorm, SwiGLU and RoPE passes (parallel/csrc/elementwise.cpp) against torch's ops, in fp32 and
bf16: shapes on and off the vector width, one thread and several, extreme gate values, strided inputs; RoPE
to the bit;
the wave's module swap (parallel/cpu_elementwise.py). A real rollout through them:
tests/rollout/test_rollout_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_grm.models.gemma2 import Gemma2RMSNorm
from megatron_grm.models.swiglu import SwiGLU
from megatron_grm.parallel import cpu_decode, cpu_decode_kernel
from megatron_grm.parallel.cpu_elementwise import fused_norms_and_swiglu

from .test_cpu_decode_kernel import fresh_probe, needs_compiler  # noqa: F401 (a fixture)

pytestmark = needs_compiler

# Rows x channels: a decode step's (one thread), a prefill's (past the kernels' 2^15-element threshold: the
# rows split between threads), and channel counts that leave a remainder past the vector width.
SHAPES = [(1, 32, 512), (2, 3, 37), (700, 2, 64), (4, 1, 9)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_torch_and_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    got = cpu_decode_kernel.rms_norm(x, w, 1e-5)
    want = F.rms_norm(x.double(), (shape[-1],), w.double(), 1e-5)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=2e-6, atol=2e-6)


def test_rms_norm_reads_a_strided_input_and_checks_its_weight():
    x = torch.randn(6, 2, 80)[..., :64]  # rows 80 apart
    w = torch.randn(64)
    torch.testing.assert_close(cpu_decode_kernel.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6),
                               rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="weight"):
        cpu_decode_kernel.rms_norm(x, torch.randn(63), 1e-6)
    with pytest.raises(ValueError, match="input's dtype"):
        cpu_decode_kernel.rms_norm(x.bfloat16(), w, 1e-6)  # torch's mixed-dtype norm rounds otherwise
    with pytest.raises(ValueError, match="fp32 or bf16"):
        cpu_decode_kernel.rms_norm(x.half(), w.half(), 1e-6)


# bf16: computed in fp32 and rounded where torch's bf16 ops round, so equal to torch's results but for the
# rare element whose fp32 value lies within the kernels' last-bit differences (sum order, exp) of a bf16
# rounding boundary: at most one bf16 step apart, in at most 1 of 1,000 elements.
def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    differ = got != want
    assert int(differ.sum()) <= max(1, want.numel() // 1000)
    step = want.float().abs().clamp(min=1e-30) * 2.0 ** -7  # one bf16 step (8 significant bits)
    assert ((got.float() - want.float()).abs() <= step).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_rms_norm_and_swiglu_match_torchs_bf16_ops(shape):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    x, w = (torch.randn(shape, generator=g) * 3).bfloat16(), (torch.rand(shape[-1], generator=g) + 0.5).bfloat16()
    _assert_bf16_close(cpu_decode_kernel.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5))
    h = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4).bfloat16()
    gate, up = h.chunk(2, dim=-1)
    _assert_bf16_close(cpu_decode_kernel.swiglu(h), F.silu(gate) * up)  # silu rounded, then the product


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_torch_and_float64(shape):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4
    got = cpu_decode_kernel.swiglu(x)
    gate, up = x.double().chunk(2, dim=-1)
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], shape[-1])
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=2e-6, atol=1e-7)


def test_swiglu_at_extreme_gates():
    """exp is taken of -|gate| only: large gates of either sign neither overflow nor lose the sign."""
    gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, -0.0, 1e-3, 20.0, 88.0, 100.0, 1e4])
    x = torch.cat((gate, torch.full_like(gate, 1.5)))[None]
    got = cpu_decode_kernel.swiglu(x)
    want = F.silu(gate.double()) * 1.5
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0].double(), want, rtol=2e-6, atol=1e-30)
    with pytest.raises(ValueError, match="even"):
        cpu_decode_kernel.swiglu(torch.randn(2, 5))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("b,s,h,d,half,per_row", [(32, 1, 8, 64, 32, True), (2, 5, 3, 64, 16, False),
                                                  (3, 7, 2, 10, 4, True), (8, 40, 8, 64, 32, False)])
def test_rotary_equals_the_torch_ops_to_the_bit(b, s, h, d, half, per_row, interleaved):
    """Megatron hands RoPE a permuted [s, b] tensor: the kernel reads it strided and returns the same
    layout. Products are rounded before the sums, as torch rounds them (no fused multiply-add)."""
    g = torch.Generator().manual_seed(b * s + d)
    x = torch.randn(s, b, h, d, generator=g).permute(1, 0, 2, 3)
    cos = torch.randn(b if per_row else 1, s, 1, half, generator=g)
    sin = torch.randn(cos.shape, generator=g)
    for dtype in (torch.float32, torch.bfloat16):  # bf16: each product and sum rounded as torch's ops round it
        x, cos, sin = x.to(dtype), cos.to(dtype), sin.to(dtype)
        got = cpu_decode_kernel.rotary(x, cos, sin, interleaved)
        assert got.dtype == dtype and torch.equal(got, cpu_decode._rotate_with_torch(x, cos, sin, interleaved))
        assert got.stride() == x.stride()
        assert torch.equal(cpu_decode._rotate(x, cos, sin, interleaved), got)  # the decode path takes it
    with pytest.raises(ValueError, match="input's dtype"):
        cpu_decode_kernel.rotary(x, cos.float(), sin.float(), interleaved)


class _Config:  # what Gemma2RMSNorm reads of a TransformerConfig
    params_dtype = torch.float32
    sequence_parallel = False


def _norm_and_swiglu_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"norm": torch.nn.RMSNorm(24, eps=1e-5), "act": SwiGLU(),
                                 "gemma_norm": Gemma2RMSNorm(_Config(), 24)})
    with torch.no_grad():
        model["norm"].weight.normal_()
    return model


def test_a_wave_swaps_the_norms_and_swiglus_and_restores_them():
    """Inside the block the model's torch RMSNorm and SwiGLU run the kernels (counted) with inference on;
    with grad enabled they run their own forward (same graph as outside); other norms are left alone;
    after the block no module keeps a swapped forward."""
    model = _norm_and_swiglu_model()
    x, h = torch.randn(3, 5, 24), torch.randn(3, 5, 48)
    with torch.no_grad():
        want_norm, want_act = model["norm"](x), model["act"](h)
    with fused_norms_and_swiglu(model) as stats:
        assert (stats.norms, stats.swiglus) == (1, 1)
        assert "forward" not in model["gemma_norm"].__dict__
        with torch.inference_mode():
            got_norm, got_act = model["norm"](x), model["act"](h)
        assert stats.kernel_calls == 2 and stats.module_calls == 0
        torch.testing.assert_close(got_norm, want_norm, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got_act, want_act, rtol=2e-6, atol=1e-7)
        trained = model["norm"](x.requires_grad_())
        assert stats.module_calls == 1 and trained.grad_fn is not None
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_bf16_norm_takes_the_kernel_only_with_a_bf16_weight():
    """A bf16 model's norm (bf16 weight) and SwiGLU run the kernels on bf16 inputs; a norm with an fp32 weight
    given a bf16 input runs torch's own mixed-dtype forward, whose rounding differs."""
    model = _norm_and_swiglu_model()
    model["norm"].to(torch.bfloat16)
    mixed = torch.nn.RMSNorm(24, eps=1e-5)  # fp32 weight
    model["mixed"] = mixed
    x, h = torch.randn(3, 5, 24).bfloat16(), torch.randn(3, 5, 48).bfloat16()
    with torch.no_grad():
        want = model["norm"](x), model["act"](h), mixed(x)
    with fused_norms_and_swiglu(model) as stats, torch.inference_mode():
        got = model["norm"](x), model["act"](h), mixed(x)
        assert (stats.kernel_calls, stats.module_calls) == (2, 1)
    for a, b in zip(got, want):
        _assert_bf16_close(a, b)
    assert torch.equal(got[2], want[2])


@pytest.mark.usefixtures("fresh_probe")
def test_without_the_library_nothing_is_swapped(monkeypatch):
    monkeypatch.setenv(cpu_decode_kernel.DISABLE_VARIABLE, "0")
    model = _norm_and_swiglu_model()
    with fused_norms_and_swiglu(model) as stats:
        assert (stats.norms, stats.swiglus) == (0, 0)
        assert all("forward" not in m.__dict__ for m in model.modules())


def test_argmax_logsumexp_matches_torch_and_hands_odd_rows_back():
    """One pass per row: torch.argmax's index (the first of tied maxima) and torch.logsumexp; rows of a
    decode step's shape and off the vector width, strided rows; None for a NaN, +inf or all -inf row and for
    inputs of another kind, which the controller then gives to torch's ops."""
    g = torch.Generator().manual_seed(3)
    for rows, n in ((32, 8192), (3, 13), (1, 1)):
        x = torch.randn(rows, n, generator=g) * 4
        x[0, n // 2] = x[0].max() + 1  # a clear maximum ...
        x[0, n - 1] = x[0, n // 2]  # ... tied later in the row: the first wins
        found = cpu_decode_kernel.argmax_logsumexp(x)
        assert found is not None
        assert torch.equal(found[0], x.argmax(dim=-1))
        torch.testing.assert_close(found[1], torch.logsumexp(x, dim=-1), rtol=1e-6, atol=1e-6)
    wide = torch.randn(4, 40, generator=g)
    found = cpu_decode_kernel.argmax_logsumexp(wide[:, :33])  # rows 40 apart
    assert torch.equal(found[0], wide[:, :33].argmax(dim=-1))
    torch.testing.assert_close(found[1], torch.logsumexp(wide[:, :33], dim=-1), rtol=1e-6, atol=1e-6)
    logits = torch.randn(2, 64, generator=g)
    masked = logits.clone()
    masked[1, 40:] = float("-inf")  # -inf logits (a vocabulary cut) are fine
    torch.testing.assert_close(cpu_decode_kernel.argmax_logsumexp(masked)[1], torch.logsumexp(masked, dim=-1))
    for bad in (float("nan"), float("inf")):
        odd = logits.clone()
        odd[1, 5] = bad
        assert cpu_decode_kernel.argmax_logsumexp(odd) is None
    assert cpu_decode_kernel.argmax_logsumexp(torch.full((2, 8), float("-inf"))) is None
    assert cpu_decode_kernel.argmax_logsumexp(logits.double()) is None
    # bf16 logits (a bf16 model's): torch.argmax's index and the log-sum-exp of the logits widened to fp32.
    x = (torch.randn(32, 8192, generator=g) * 4).bfloat16()
    x[3, 100] = x[3, 7] = x[3].max() + 1  # tied: the first wins
    found = cpu_decode_kernel.argmax_logsumexp(x)
    assert found is not None and found[1].dtype == torch.float32
    assert torch.equal(found[0], x.argmax(dim=-1)) and int(found[0][3]) == 7
    torch.testing.assert_close(found[1], torch.logsumexp(x.float(), dim=-1), rtol=1e-6, atol=1e-6)
    odd = x.clone()
    odd[0, 0] = float("nan")
    assert cpu_decode_kernel.argmax_logsumexp(odd) is None
    assert cpu_decode_kernel.argmax_logsumexp(x.half()) is None
    assert cpu_decode_kernel.argmax_logsumexp(logits.t()) is None  # columns not contiguous
