"""The C++ GEMM (parallel/csrc/linear.cpp) against ``F.linear`` in float64: row counts around
the micro-kernel's tile and its row chunks, output counts that leave a partial last panel, strided inputs,
bias; builds for other tile shapes and older CPUs; its use by parallel/onednn_linear.py for a wave's
GEMMs. A real rollout through it: tests/rollout/test_rollout_engine.py."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from megatron_grm.parallel import cpu_decode_kernel, onednn_linear

from .conftest import with_march
from .test_cpu_decode_kernel import NATIVE_IS_AVX2, _cpu_flags, fresh_probe, needs_compiler  # noqa: F401 (a fixture)
from .test_onednn_linear import _Layer, _reference

pytestmark = needs_compiler


def _assert_fp32_close(got: torch.Tensor, want: torch.Tensor, inner: int) -> None:
    """fp32 round-off of an ``inner``-term sum of products of unit normals (torch's own matmul is off by as
    much): a few ulps of the sum's typical size, sqrt(inner)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * math.sqrt(inner) * 8)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 32, 33, 97, 300])
@pytest.mark.parametrize("inner,out", [(24, 5), (512, 1000), (1536, 512), (64, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(rows, inner, out, with_bias):
    """Rows in whole tiles, one short of one, one over, several blocks, several row chunks of 96 (97: a
    chunk of one row); outputs of a partial panel (5, 1000) and whole ones; sums long enough (1536) that the
    prefetch ahead runs past the panel's end."""
    g = torch.Generator().manual_seed(rows * 7 + inner + out)
    x, w = torch.randn(rows, inner, generator=g), torch.randn(out, inner, generator=g)
    b = torch.randn(out, generator=g) * 10 if with_bias else None
    packed = cpu_decode_kernel.pack_linear_weight(w)
    width = packed.shape[-1]
    assert packed.shape == (math.ceil(out / width), inner, width)
    _assert_fp32_close(cpu_decode_kernel.packed_linear(x, packed, out, b), _reference(x, w, b), inner)


def test_packed_linear_takes_any_leading_shape_and_strided_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 64, generator=g)
    packed = cpu_decode_kernel.pack_linear_weight(w)
    wide = torch.randn(4, 3, 96, generator=g)
    x = wide[..., 16:80]  # rows 96 floats apart
    got = cpu_decode_kernel.packed_linear(x, packed, 100)
    assert got.shape == (4, 3, 100)
    _assert_fp32_close(got, _reference(x, w, None), 64)
    seq_first = torch.randn(3, 4, 64, generator=g).transpose(0, 1)  # [b, s] view of [s, b]: not one stride
    _assert_fp32_close(cpu_decode_kernel.packed_linear(seq_first, packed, 100), _reference(seq_first, w, None), 64)
    assert cpu_decode_kernel.packed_linear(torch.empty(0, 64), packed, 100).shape == (0, 100)


def test_packed_linear_rejects_what_it_cannot_compute():
    w = torch.randn(40, 32)
    packed = cpu_decode_kernel.pack_linear_weight(w)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="output features"):
        cpu_decode_kernel.packed_linear(x, packed, 400)
    with pytest.raises(ValueError, match="input"):
        cpu_decode_kernel.packed_linear(x.double(), packed, 40)
    with pytest.raises(ValueError, match="input"):
        cpu_decode_kernel.packed_linear(torch.randn(2, 31), packed, 40)
    with pytest.raises(ValueError, match="bias"):
        cpu_decode_kernel.packed_linear(x, packed, 40, torch.randn(41))
    with pytest.raises(ValueError, match="pack_linear_weight"):
        cpu_decode_kernel.packed_linear(x, w.t().contiguous().view(1, 32, 40), 40)
    with pytest.raises(ValueError, match="2-D"):
        cpu_decode_kernel.pack_linear_weight(torch.randn(3, 4, 5))


def test_the_cpp_gemm_runs_where_measured_faster_unless_told(monkeypatch):
    """By default the row counts measured faster for this build's instruction set (AVX2: all; AVX-512: a
    decode step's); the variable's 1 / 0 force every row count / none."""
    simd = cpu_decode_kernel._library().mgrm_attention_simd().decode()
    monkeypatch.delenv(cpu_decode_kernel.LINEAR_VARIABLE, raising=False)
    assert cpu_decode_kernel.linear_kernel_rows() == {"AVX2": cpu_decode_kernel.ALL_ROWS, "AVX-512": 32}.get(simd, 0)
    monkeypatch.setenv(cpu_decode_kernel.LINEAR_VARIABLE, "1")
    assert cpu_decode_kernel.linear_kernel_rows() == cpu_decode_kernel.ALL_ROWS
    monkeypatch.setenv(cpu_decode_kernel.LINEAR_VARIABLE, "0")
    assert cpu_decode_kernel.linear_kernel_rows() == 0


def _check_builds_compute_the_same() -> None:
    for rows, inner, out in ((1, 24, 5), (7, 512, 1000), (33, 1536, 48)):
        test_packed_linear_matches_float64(rows, inner, out, True)
    test_packed_linear_takes_any_leading_shape_and_strided_rows()


@pytest.mark.parametrize("flags,width", [(("-march=x86-64",), 16), (("-march=haswell",), 16),
                                         (("-DMGRM_GEMM_NC=2", "-DMGRM_GEMM_MR=8"), 32)])
@pytest.mark.usefixtures("fresh_probe")
def test_builds_for_other_cpus_and_tiles_compute_the_same(flags, width, other_cpu_builds, monkeypatch):
    """The scalar loop (any x86-64), the AVX2 tile (as an AVX-512 node builds it for a shared cache's AVX2
    neighbours), and AVX-512's tile shape, 2 vectors of 16 columns x 8 rows (here in AVX2 registers too)."""
    march = next((f.split("=", 1)[1] for f in flags if f.startswith("-march=")), None)
    if platform.machine() != "x86_64" or (march == "haswell" and not {"avx2", "fma", "f16c"} <= _cpu_flags()):
        pytest.skip(f"needs an x86-64 CPU that runs {march} code")
    if march == "haswell" and "avx512f" not in _cpu_flags():
        pytest.skip(NATIVE_IS_AVX2)
    if march is None and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("the 2 x 16-column tile is compiled with AVX2 or AVX-512")
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(other_cpu_builds))
    extra = tuple(f for f in flags if not f.startswith("-march="))
    monkeypatch.setattr(cpu_decode_kernel, "FLAGS", with_march(cpu_decode_kernel.FLAGS, march or "native") + extra)
    assert cpu_decode_kernel._library().mgrm_linear_panel() == width
    _check_builds_compute_the_same()


@pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")
def test_a_waves_fp32_gemms_run_the_kernel_on_one_packed_copy():
    """With the kernel on, a layer's decode-step and prefill-sized GEMMs both run it on the weight packed
    once; a changed weight is packed again; the results are F.linear's. Off, the layer runs oneDNN."""
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, kernel_rows=cpu_decode_kernel.ALL_ROWS)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(768, generator=g)
    decode, prefill = torch.randn(32, 1, 512, generator=g), torch.randn(300, 512, generator=g)
    weight = layer.weight.detach().clone()
    with torch.inference_mode():
        first = gemm(decode, layer.weight, bias=bias)
        assert (stats.panels, stats.kernel_calls, stats.reordered) == (1, 1, 0) and gemm.packed is None
        _assert_fp32_close(first, _reference(decode, weight, bias), 512)
        assert torch.equal(gemm(decode, layer.weight, bias=bias), first)
        _assert_fp32_close(gemm(prefill, layer.weight, bias=bias), _reference(prefill, weight, bias), 512)
        _assert_fp32_close(gemm(decode[:, 0], layer.weight), _reference(decode[:, 0], weight, None), 512)
        assert (stats.panels, stats.kernel_calls, stats.calls, stats.reordered) == (1, 4, 4, 0)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # a refit writes the weight in place
    with torch.inference_mode():
        _assert_fp32_close(gemm(decode, layer.weight, bias=bias), _reference(decode, -2 * weight, bias), 512)
    assert stats.panels == 2 and layer.own_calls == 0 and stats.fallbacks == 0

    off_stats = onednn_linear.PackStats()
    off = onednn_linear._PackedGemm(layer, rows=32, stats=off_stats)
    with torch.inference_mode():
        _assert_fp32_close(off(prefill, layer.weight, bias=bias), _reference(prefill, -2 * weight, bias), 512)
    assert (off_stats.reordered, off_stats.panels, off_stats.kernel_calls) == (1, 0, 0) and off.panels is None


@pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")
def test_a_row_limit_sends_a_prefills_gemms_to_onednn_and_the_decode_steps_to_the_kernel():
    """``kernel_rows`` (an AVX-512 CPU's 32): GEMMs of up to that many rows run the kernel, larger ones oneDNN,
    each on its own layout of the weight, the other copy dropped; every result is F.linear's."""
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, kernel_rows=32)
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(768, generator=g)
    decode, prefill = torch.randn(32, 1, 512, generator=g), torch.randn(33, 512, generator=g)
    weight = layer.weight.detach()
    with torch.inference_mode():
        _assert_fp32_close(gemm(prefill, layer.weight, bias=bias), _reference(prefill, weight, bias), 512)
        assert (stats.reordered, stats.panels, stats.kernel_calls) == (1, 0, 0) and gemm.panels is None
        for _ in range(2):
            _assert_fp32_close(gemm(decode, layer.weight, bias=bias), _reference(decode, weight, bias), 512)
        assert (stats.reordered, stats.panels, stats.kernel_calls) == (1, 1, 2) and gemm.packed is None
        _assert_fp32_close(gemm(prefill, layer.weight), _reference(prefill, weight, None), 512)
        assert (stats.reordered, stats.panels, stats.kernel_calls, stats.calls) == (2, 1, 2, 4)
    assert layer.own_calls == 0 and stats.fallbacks == 0


@pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")
def test_bf16_weights_without_a_bf16_gemm_take_the_kernel_in_fp32():
    """A bf16 model on a CPU without a bf16 GEMM: its GEMMs multiply the bf16 operands in fp32 in the
    kernel (exact products, fp32 sums) and round the output to bf16 once. Where oneDNN has a bf16 GEMM, the
    bf16 weights stay on it."""
    layer = _Layer(768, 512)
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, kernel_rows=cpu_decode_kernel.ALL_ROWS)
    g = torch.Generator().manual_seed(5)
    weight, x = torch.randn(768, 512, generator=g).bfloat16(), torch.randn(32, 512, generator=g).bfloat16()
    with torch.inference_mode():
        got = gemm(x, weight, bias=None)
    assert got.dtype == torch.bfloat16 and got.shape == (32, 768)
    widened = onednn_linear.gemm_dtype(torch.bfloat16) is torch.float32
    amx = not widened and cpu_decode_kernel.amx_available()  # a bf16 GEMM of 32 rows: the AMX kernel's
    assert (stats.kernel_calls, stats.reordered, stats.widened, stats.amx_calls) == (
        (1, 0, 1, 0) if widened else (0, 0, 0, 1) if amx else (0, 1, 0, 0))
    want = _reference(x, weight, None)
    step = want.abs().clamp(min=1.0) * 2.0 ** -7  # one bf16 step at the output's size
    assert bool(((got.double() - want).abs() <= step).all())


def _needs_amx() -> None:
    if not cpu_decode_kernel.amx_available():
        pytest.skip("this CPU (or this build) has no AMX: no AMX GEMM to test")


def _assert_bf16_gemm_close(got: torch.Tensor, want: torch.Tensor, inner: int) -> None:
    """One bf16 rounding of the output (8 significant bits) plus the fp32 sum's round-off."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    error = (got.double() - want).abs()
    assert bool((error <= want.abs() * 2.0 ** -8 + 1e-5 * math.sqrt(inner) * 8).all())


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 32])
@pytest.mark.parametrize("inner,out", [(512, 512), (300, 1000), (1536, 512), (24, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_linear_matches_float64_and_onednn(rows, inner, out, with_bias):
    """The AMX GEMM (bf16 products summed in fp32 on tiles, rounded once): rows in one tile and two, part
    tiles, inputs and outputs off the tiles' 32 (zero-padded), a bias; within one bf16 rounding of the
    float64 product, and (but for rare summation-order ties) oneDNN's bf16 result bit for bit."""
    _needs_amx()
    g = torch.Generator().manual_seed(rows * 5 + inner + out)
    x = torch.randn(rows, inner, generator=g).bfloat16()
    w = torch.randn(out, inner, generator=g).bfloat16()
    b = (torch.randn(out, generator=g) * 10).bfloat16() if with_bias else None
    packed = cpu_decode_kernel.pack_amx_weight(w)
    assert packed.shape == (math.ceil(out / 32), math.ceil(inner / 32), 2, 16, 16, 2)
    got = cpu_decode_kernel.amx_linear(x, packed, out, b)
    _assert_bf16_gemm_close(got, _reference(x, w, b), inner)
    if onednn_linear.available(torch.bfloat16):
        same = got == onednn_linear.linear(x, onednn_linear.reorder(w, rows), b)
        assert same.float().mean() >= 0.99


def test_amx_linear_takes_leading_shapes_and_rejects_what_it_cannot_compute():
    _needs_amx()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g).bfloat16()
    packed = cpu_decode_kernel.pack_amx_weight(w)
    x = torch.randn(32, 1, 96, generator=g).bfloat16()  # a decode step's [rows, 1, in]
    got = cpu_decode_kernel.amx_linear(x, packed, 64)
    assert got.shape == (32, 1, 64)
    _assert_bf16_gemm_close(got, _reference(x, w, None), 96)
    with pytest.raises(ValueError, match="at most 32"):
        cpu_decode_kernel.amx_linear(torch.randn(33, 96).bfloat16(), packed, 64)
    with pytest.raises(ValueError, match="bf16"):
        cpu_decode_kernel.amx_linear(x.float(), packed, 64)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_decode_kernel.amx_linear(x, packed, 100)
    with pytest.raises(ValueError, match="bias"):
        cpu_decode_kernel.amx_linear(x, packed, 64, torch.randn(64))
    with pytest.raises(ValueError, match="pack_amx_weight"):
        cpu_decode_kernel.amx_linear(x, packed.float(), 64)
    with pytest.raises(ValueError, match="bf16"):
        cpu_decode_kernel.pack_amx_weight(w.float())


@pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")
def test_a_bf16_decode_steps_gemms_take_the_amx_kernel_and_a_prefills_onednn(monkeypatch):
    """With AMX, a bf16 layer's GEMMs of up to 32 rows (a decode step's) run the AMX kernel on the weight
    packed for its tiles, larger ones (a prefill's) oneDNN on its reordered copy, each result F.linear's up
    to bf16 rounding; with the kernels' rows at 0 (MEGATRON_GRM_CPU_LINEAR_KERNEL=0), or without AMX, none
    runs it."""
    _needs_amx()
    if not onednn_linear.available(torch.bfloat16):
        pytest.skip("this torch build's oneDNN has no bf16 linear")
    layer = _Layer(768, 512)
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(768, 512, generator=g).bfloat16()
    decode, prefill = torch.randn(32, 1, 512, generator=g).bfloat16(), torch.randn(33, 512, generator=g).bfloat16()
    stats = onednn_linear.PackStats()
    gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, kernel_rows=32)
    with torch.inference_mode():
        _assert_bf16_gemm_close(gemm(prefill, weight, bias=None), _reference(prefill, weight, None), 512)
        assert (stats.reordered, stats.amx_tiles, stats.amx_calls) == (1, 0, 0)
        for _ in range(2):
            _assert_bf16_gemm_close(gemm(decode, weight, bias=None), _reference(decode, weight, None), 512)
        assert (stats.reordered, stats.amx_tiles, stats.amx_calls) == (1, 1, 2) and gemm.packed is None
        _assert_bf16_gemm_close(gemm(prefill, weight, bias=None), _reference(prefill, weight, None), 512)
        assert (stats.reordered, stats.amx_tiles, stats.calls) == (2, 1, 4) and gemm.tiles is None
    for kernel_rows, amx in ((0, True), (32, False)):
        monkeypatch.setattr(cpu_decode_kernel, "amx_available", lambda amx=amx: amx)
        stats = onednn_linear.PackStats()
        gemm = onednn_linear._PackedGemm(layer, rows=32, stats=stats, kernel_rows=kernel_rows)
        with torch.inference_mode():
            _assert_bf16_gemm_close(gemm(decode, weight, bias=None), _reference(decode, weight, None), 512)
        assert (stats.amx_calls, stats.reordered) == (0, 1)
    assert layer.own_calls == 0
