"""parallel/onednn_linear.py: a linear layer's GEMM on oneDNN with the weight reordered once, against
``F.linear`` in float64; reordered again when the weight changes; autograd keeps the layer's own GEMM, and
small weights too but for the C++ GEMM's calls. Megatron's layers under it in a real rollout:
tests/rollout/test_rollout_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_grm.parallel import cpu_decode_kernel, onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")


class _Layer(torch.nn.Module):
    """The part of Megatron's linear layers the swap touches: ``_forward_impl(input, weight, bias=...)``."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1)))
        self.own_calls = 0

    def _forward_impl(self, input, weight, bias=None, **kwargs):
        self.own_calls += 1
        return F.linear(input, weight, bias)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("shape,hint", [((32, 512), 32), ((5, 3, 512), 15), ((1, 512), 64), ((200, 512), 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_on_a_reordered_weight_is_f_linear(shape, hint, with_bias):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(768, 512, generator=g), torch.randn(*shape, generator=g)
    b = torch.randn(768, generator=g) if with_bias else None
    with torch.inference_mode():
        got = onednn_linear.linear(x, onednn_linear.reorder(w, hint), b)
    assert got.shape == (*shape[:-1], 768) and got.dtype == torch.float32
    # fp32 round-off of a 512-term sum (torch's own matmul is off by the same order here)
    torch.testing.assert_close(got.double(), _reference(x, w, b), rtol=1e-5, atol=3e-4)


def test_a_strided_input_gives_the_same_result():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(640, 512, generator=g), torch.randn(3, 7, 512, generator=g).transpose(0, 1)
    with torch.inference_mode():
        got = onednn_linear.linear(x, onednn_linear.reorder(w, 21))
    torch.testing.assert_close(got.double(), _reference(x, w, None), rtol=1e-5, atol=3e-4)


def test_reordered_once_then_again_when_the_weight_changes():
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=4, stats=stats)
    x = torch.randn(4, 512)
    with torch.inference_mode():
        first = [gemm(x, layer.weight, bias=None) for _ in range(3)]
    assert stats.reordered == 1 and stats.calls == 3 and layer.own_calls == 0
    torch.testing.assert_close(first[0].double(), _reference(x, layer.weight.detach(), None), rtol=1e-5, atol=3e-4)

    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an optimizer step / a refit writes the weight in place
    with torch.inference_mode():
        after = gemm(x, layer.weight, bias=None)
    assert stats.reordered == 2
    torch.testing.assert_close(after, -2.0 * first[0], rtol=1e-5, atol=1e-3)

    tied = torch.randn(768, 512)  # a tied output layer is handed the embedding's weight with each call
    with torch.inference_mode():
        other = gemm(x, tied, bias=None)
    assert stats.reordered == 3
    torch.testing.assert_close(other.double(), _reference(x, tied, None), rtol=1e-5, atol=3e-4)


def test_autograd_small_and_non_fp32_weights_keep_the_layers_own_gemm():
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=4, stats=stats)
    x = torch.randn(4, 512, requires_grad=True)
    out = gemm(x, layer.weight, bias=None)  # autograd on: a training forward
    out.sum().backward()
    assert layer.weight.grad is not None and stats.calls == 0 and layer.own_calls == 1
    small = torch.randn(64, 512)
    with torch.inference_mode():
        torch.testing.assert_close(gemm(x.detach(), small, bias=None), F.linear(x.detach(), small), rtol=0, atol=0)
        gemm(x.detach().double(), layer.weight.detach().double(), bias=None)
    assert stats.calls == 0 and stats.fallbacks == 3 and layer.own_calls == 3


@pytest.mark.skipif(not onednn_linear.available(torch.bfloat16), reason="this CPU's oneDNN has no bf16 linear")
def test_bf16_weights_are_reordered_and_multiplied_in_bf16():
    """A bf16 model's rollouts where the CPU multiplies bf16 (``widen_bf16=False`` asks for that path wherever
    oneDNN has a bf16 linear): its weights take the reordered path too, within bf16's own rounding."""
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, widen_bf16=False)
    g = torch.Generator().manual_seed(2)
    weight, x = torch.randn(768, 512, generator=g).bfloat16(), torch.randn(32, 512, generator=g).bfloat16()
    bias = torch.randn(768, generator=g).bfloat16()
    with torch.inference_mode():
        got = gemm(x, weight, bias=bias)
    assert stats.reordered == 1 and stats.calls == 1 and got.dtype == torch.bfloat16
    want = _reference(x, weight, bias)  # the bf16 operands' exact products
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0.25)  # outputs ~20: bf16 steps of 1/8
    assert stats.fallbacks == 0 and layer.own_calls == 0


@pytest.mark.parametrize("widen", [True, None])
def test_bf16_weights_without_a_bf16_gemm_multiply_in_fp32(widen):
    """A CPU without a bf16 GEMM (``widen=None`` there; ``True`` asks for it anywhere): the bf16 weight is
    reordered as fp32 once, and the output is the fp32 GEMM of the bf16 operands (exact products, fp32 sums)
    rounded to bf16 once: within one bf16 step of the float64 result rounded."""
    if widen is None and onednn_linear.gemm_dtype(torch.bfloat16) is torch.bfloat16:
        pytest.skip("this CPU has a bf16 GEMM: bf16 weights stay bf16 (the test above)")
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, widen_bf16=widen)
    g = torch.Generator().manual_seed(3)
    weight, x = torch.randn(768, 512, generator=g).bfloat16(), torch.randn(2, 16, 512, generator=g).bfloat16()
    bias = torch.randn(768, generator=g).bfloat16()
    with torch.inference_mode():
        got = gemm(x, weight, bias=bias)
        again = gemm(x, weight, bias=bias)
    assert stats.reordered == stats.widened == 1 and stats.calls == 2 and stats.fallbacks == 0
    assert got.dtype == torch.bfloat16 and got.shape == (2, 16, 768) and torch.equal(got, again)
    want = _reference(x, weight, bias)
    step = want.abs().clamp(min=1.0) * 2.0 ** -7  # one bf16 step (8 significant bits) at the output's size
    assert bool(((got.double() - want).abs() <= step).all())
    assert float((got.double() - want.bfloat16().double()).abs().max()) <= float(step.max())
    assert layer.own_calls == 0


@pytest.mark.parametrize(("onednn_bf16", "onednn_fp32", "native", "widened"), [
    (True, True, True, False),  # AVX512-BF16 / AMX: oneDNN's bf16 GEMM
    (True, True, False, True),  # AVX-512 without them: oneDNN emulates bf16 at a fifth of its fp32 rate
    (False, True, False, True),  # AVX2: no bf16 linear in oneDNN
    (False, True, True, True),  # a build whose oneDNN lacks the bf16 op
    (True, False, True, False), (True, False, False, False), (False, False, False, False),  # no fp32 op to widen to
])
def test_bf16_weights_are_widened_unless_the_cpu_multiplies_bf16(onednn_bf16, onednn_fp32, native, widened):
    assert onednn_linear.widens_bf16(onednn_bf16, onednn_fp32, native) is widened


def test_this_cpus_bf16_gemm_dtype_follows_its_bf16_arithmetic():
    """On this machine: fp32 for bf16 weights unless the CPU has AVX512-BF16 or AMX and oneDNN a bf16 linear."""
    if not onednn_linear.available(torch.float32):
        pytest.skip("this torch build has no oneDNN fp32 linear to widen to")
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert onednn_linear.cpu_multiplies_bf16() is native
    bf16_here = native and onednn_linear.available(torch.bfloat16)
    assert onednn_linear.gemm_dtype(torch.bfloat16) is (torch.bfloat16 if bf16_here else torch.float32)


def test_availability_is_probed_once_per_dtype_whatever_the_callers_context():
    """The first question may come from inside a training forward or a ``torch.device`` block: the probe
    runs on the CPU regardless, and ``available()`` and ``available(torch.float32)`` share its answer."""
    onednn_linear._probe.cache_clear()
    with torch.device("meta"):
        inside = onednn_linear.available()
    assert inside is True  # the module skips where oneDNN's ops are missing
    assert onednn_linear.available(torch.float32) is True and onednn_linear._probe.cache_info().misses == 1


def test_worth_packing_is_large_two_dimensional_fp32_on_the_cpu():
    big = torch.empty(512, 512)
    assert onednn_linear.worth_packing(big)
    assert not onednn_linear.worth_packing(torch.empty(511, 512))
    assert not onednn_linear.worth_packing(big.bfloat16())  # training's forward GEMMs: fp32 only
    # bf16: reordered as bf16 where this CPU has a bf16 GEMM, else as fp32 (gemm_dtype)
    assert onednn_linear.gemm_dtype(torch.bfloat16) == (
        torch.float32 if onednn_linear.widens_bf16(onednn_linear.available(torch.bfloat16), True,
                                                   onednn_linear.cpu_multiplies_bf16()) else torch.bfloat16)
    assert onednn_linear.worth_packing(big.bfloat16(), onednn_linear.ROLLOUT_DTYPES)
    assert not onednn_linear.worth_packing(big.double(), onednn_linear.ROLLOUT_DTYPES)
    assert not onednn_linear.worth_packing(torch.empty(512 * 512))
    assert not onednn_linear.worth_packing(None)
    assert onednn_linear.worth_packing(torch.empty(384, 128), min_elements=0)  # for the C++ GEMM: any size
    assert not onednn_linear.worth_packing(torch.empty(384, 128).double(), onednn_linear.ROLLOUT_DTYPES, 0)


_needs_cpp_gemm = pytest.mark.skipif(cpu_decode_kernel._library() is None,
                                     reason="the C++ kernels could not be built here (no compiler)")


@_needs_cpp_gemm
def test_small_weights_run_the_cpp_gemm_where_it_runs_and_megatrons_gemm_elsewhere():
    """A weight under PACK_MIN_ELEMENTS (the CPU demo's 384 x 128): packed once for the C++ GEMM and run there
    for GEMMs of at most ``kernel_rows`` rows; larger GEMMs go to the layer's own GEMM, never to oneDNN (no
    reorder), and with the C++ GEMM off every GEMM does."""
    assert 384 * 128 < onednn_linear.PACK_MIN_ELEMENTS
    layer = _Layer(384, 128)
    weight = layer.weight.detach()
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=8, stats=stats, kernel_rows=8)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(384, generator=g)
    with torch.inference_mode():
        for rows in (1, 8, 8, 9, 64):
            x = torch.randn(rows, 128, generator=g)
            got = gemm(x, weight, bias=bias)
            torch.testing.assert_close(got.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert stats.panels == 1 and stats.kernel_calls == stats.calls == 3  # rows 1, 8, 8: packed once
    assert stats.fallbacks == layer.own_calls == 2 and stats.reordered == 0  # rows 9 and 64
    off = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=8, stats=off)  # kernel_rows=0: the C++ GEMM is off
    with torch.inference_mode():
        gemm(torch.randn(8, 128, generator=g), weight, bias=None)
    assert off.calls == off.panels == off.reordered == 0 and off.fallbacks == 1 and layer.own_calls == 3


@_needs_cpp_gemm
def test_a_small_bf16_weight_without_a_bf16_gemm_is_widened_into_the_cpp_gemm():
    """A bf16 model of the demo's size on a CPU without a bf16 GEMM (``widen_bf16=True`` asks for that path
    anywhere): its small weights run the C++ GEMM in fp32 on the bf16 operands, the output rounded once,
    instead of torch's bf16 matmul; GEMMs of more rows than the C++ GEMM takes (a wave of 128 on an AVX-512 CPU
    without bf16 arithmetic) run oneDNN's fp32 GEMM on the weight's fp32 copy, not the layer's bf16 one."""
    layer = _Layer(128, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=4, stats=stats, widen_bf16=True, kernel_rows=32)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(128, 512, generator=g).bfloat16()
    step = 2.0 ** -7  # one bf16 step (8 significant bits), relative to the output's size
    for rows in (4, 33):
        x = torch.randn(rows, 512, generator=g).bfloat16()
        with torch.inference_mode():
            got = gemm(x, weight, bias=None)
        want = _reference(x, weight, None)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 128)
        assert bool(((got.double() - want).abs() <= want.abs().clamp(min=1.0) * step).all())
        if rows == 4:
            assert stats.panels == stats.widened == stats.kernel_calls == 1 and stats.reordered == 0
    assert stats.reordered == 1 and stats.widened == 2 and stats.calls == 2 and stats.kernel_calls == 1
    assert stats.fallbacks == layer.own_calls == 0


def test_packed_linears_takes_small_weights_only_for_the_cpp_gemm():
    """The block's choice of layers: a small weight's layer is taken when the C++ GEMM is on, left to
    Megatron when it is off; a large one is taken either way."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class _Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = ColumnParallelLinear.__new__(ColumnParallelLinear)
            self.large = ColumnParallelLinear.__new__(ColumnParallelLinear)
            torch.nn.Module.__init__(self.small)
            torch.nn.Module.__init__(self.large)
            self.small.weight = torch.nn.Parameter(torch.empty(128, 128))
            self.large.weight = torch.nn.Parameter(torch.empty(512, 512))

    model = _Tiny()
    for kernel_rows, taken in ((0, 1), (32, 2)):
        with onednn_linear.packed_linears(model, rows=8, kernel_rows=kernel_rows) as stats:
            assert stats.layers == taken and stats.skipped == 2 - taken
            assert ("_forward_impl" in model.small.__dict__) == (taken == 2)
        assert "_forward_impl" not in model.small.__dict__ and "_forward_impl" not in model.large.__dict__
