"""parallel/onednn_training.py: Megatron's autograd function for its linear layers with the forward GEMM on
oneDNN. Against Megatron's own function: the same output and the same gradients (input, bias, the weight
gradient into ``main_grad`` or ``.grad``) up to fp32 round-off, with oneDNN's op in the forward; Megatron's
forward for small, non-fp32 and sequence-parallel cases; and installed by ``init_parallel`` for Megatron's
real ``ColumnParallelLinear``, its weight gradient accumulated into ``main_grad`` as under Megatron's DDP; at
TP=2 (torchrun) an MLP's column and row parallel shards, the input gradient all-reduced by Megatron's backward.
Which CPUs take it by default (where MKL does not run AVX-512), and the variable that picks either on any.
A bf16 layer's GEMMs widened to fp32 (CPUs without bf16 arithmetic): no GEMM sees a bf16 operand, forward or
backward, and the results are Megatron's bf16 ones (one rounding each, fp32 sums), alone, through
``init_parallel`` with the weight gradient in ``main_grad`` and at TP=2; which CPUs widen by default, and the
SDPA core's bf16 attention widened with them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from megatron_grm.models import sdpa_attention
from megatron_grm.parallel import onednn_linear, onednn_training, wgrad_gemm
from tests.conftest import python_json, read_json, torchrun
from tests.gemm_dtypes import GemmDtypes

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear ops")

SCRIPTS = Path(__file__).parent / "scripts"
FUNCTION_ARGS = (False, False, None, 0, None)  # allreduce_dgrad, sequence_parallel, grad buffer, deferral, group


@pytest.fixture
def classes(monkeypatch):
    """(Megatron's function, ours), with Megatron's module left as this test found it."""
    from megatron.core.tensor_parallel import layers

    wgrad_gemm.install(cuda=False)  # main_grad accumulation for fusion=True, as init_parallel installs it
    before = layers.LinearWithGradAccumulationAndAsyncCommunication
    monkeypatch.setenv(onednn_training.FORWARD_VARIABLE, "1")  # on any CPU
    monkeypatch.setenv(onednn_training.WIDEN_VARIABLE, "0")  # bf16 layers as Megatron multiplies them
    monkeypatch.setattr(sdpa_attention, "widen_bf16", sdpa_attention.widen_bf16)  # install sets it
    assert onednn_training.install(cuda=False)
    ours = layers.LinearWithGradAccumulationAndAsyncCommunication
    yield ours.megatrons, ours
    layers.LinearWithGradAccumulationAndAsyncCommunication = before


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _step(function, weight, bias, x, residual, fusion: bool):
    """One forward and backward through ``function``, the output written in place as Megatron's residual add
    does; returns (output, input grad, weight gradient, bias grad) and the forward's aten ops."""
    weight = torch.nn.Parameter(weight.clone())
    if fusion:  # (no grad_added_to_main_grad: Megatron's dummy .grad for DDP is made on "cuda"; below, in
        # a process with the CPU layer, it is set)
        weight.main_grad = torch.ones_like(weight)  # what earlier micro-batches accumulated
    bias = None if bias is None else torch.nn.Parameter(bias.clone())
    x = x.clone().requires_grad_()
    outputs = []
    ops = _ops(lambda: outputs.append(function.apply(x, weight, bias, fusion, *FUNCTION_ARGS)))
    out = outputs[0]
    out.add_(residual)
    out.square().sum().backward()
    weight_grad = weight.main_grad if fusion else weight.grad
    return (out.detach(), x.grad, weight_grad, None if bias is None else bias.grad), ops


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_on_onednn_gives_megatrons_output_and_gradients(classes, fusion, with_bias):
    megatrons, ours = classes
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(640, 512, generator=g) * 0.05, torch.randn(7, 3, 512, generator=g)
    bias = torch.randn(640, generator=g) if with_bias else None
    residual = torch.randn(7, 3, 640, generator=g)

    want, megatron_ops = _step(megatrons, weight, bias, x, residual, fusion)
    got, our_ops = _step(ours, weight, bias, x, residual, fusion)

    assert "mkldnn::_linear_pointwise" in our_ops and "mkldnn::_linear_pointwise" not in megatron_ops
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
    if fusion:  # accumulated into main_grad on top of what was there, not written to .grad
        assert not torch.allclose(got[2], torch.ones_like(got[2]))


@pytest.mark.parametrize("case", ["small weight", "bf16", "sequence parallel"])
def test_small_non_fp32_and_sequence_parallel_keep_megatrons_forward(classes, case):
    _, ours = classes
    n_out = 64 if case == "small weight" else 640
    weight = torch.nn.Parameter(torch.randn(n_out, 512))
    x = torch.randn(4, 2, 512, requires_grad=True)
    if case == "bf16":
        weight, x = torch.nn.Parameter(weight.detach().bfloat16()), x.detach().bfloat16().requires_grad_()
    if case == "sequence parallel":  # its forward all-gathers over the group first: only the decision here
        assert not onednn_training._takes(x, weight, sequence_parallel=True)
        assert onednn_training._takes(x, weight, sequence_parallel=False)
        return
    outputs = []
    ops = _ops(lambda: outputs.append(ours.apply(x, weight, None, False, *FUNCTION_ARGS)))
    assert "mkldnn::_linear_pointwise" not in ops
    torch.testing.assert_close(outputs[0].float(), (x @ weight.t()).detach().float(), rtol=1e-2, atol=1e-2)
    outputs[0].sum().backward()
    assert weight.grad is not None and x.grad is not None


_STEP_SCRIPT = textwrap.dedent("""
    import json
    import os
    import torch
    from megatron_grm.parallel import ParallelLayout, init_parallel, onednn_training
    os.environ[onednn_training.FORWARD_VARIABLE] = "1"  # oneDNN's forward on any CPU
    init_parallel(ParallelLayout())
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import TransformerConfig
    config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=8, use_cpu_initialization=True,
                               gradient_accumulation_fusion=True)
    layer = layers.ColumnParallelLinear(512, 768, config=config, init_method=torch.nn.init.xavier_normal_,
                                        bias=False, gather_output=False)
    layer.weight.main_grad = torch.zeros_like(layer.weight)  # as Megatron's DDP sets a parameter up
    layer.weight.grad_added_to_main_grad = False
    x = torch.randn(16, 2, 512, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = layer(x)
    ops = {e.key for e in prof.key_averages()}
    with onednn_training.megatrons_forward(), torch.no_grad():  # what the conversion check compares with
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as plain:
            plain_out, _ = layer(x)
    (out.float() ** 2).sum().backward()
    want = x.detach().double() @ layer.weight.detach().double().t()
    want_grad = 2 * want.reshape(-1, 768).t() @ x.detach().double().reshape(-1, 512)
    print(json.dumps({
        "installed": hasattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "megatrons"),
        "onednn_in_forward": "mkldnn::_linear_pointwise" in ops,
        "onednn_in_megatrons_forward": "mkldnn::_linear_pointwise" in {e.key for e in plain.key_averages()},
        "plain_output_error": (plain_out.double() - want).abs().max().item(),
        "installed_after_block": hasattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "megatrons"),
        "output_error": (out.double() - want).abs().max().item(),
        "weight_grad_error": (layer.weight.main_grad.double() - want_grad).abs().max().item(),
        "flagged_for_ddp": layer.weight.grad_added_to_main_grad,
        "weight_grad_scale": want_grad.abs().max().item(),
        "installed_again": onednn_training.install(cuda=False),
    }))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA processes keep Megatron's matmul")
def test_init_parallel_puts_megatrons_column_parallel_linear_forward_on_onednn():
    report = python_json(_STEP_SCRIPT)
    assert report["installed"] and report["onednn_in_forward"] and report["installed_again"]
    assert report["flagged_for_ddp"]  # Megatron's backward ran: the weight gradient went into main_grad
    assert report["output_error"] < 1e-4
    # megatrons_forward: torch's matmul inside the block, oneDNN again after it
    assert not report["onednn_in_megatrons_forward"] and report["installed_after_block"]
    assert report["plain_output_error"] < 1e-4
    assert report["weight_grad_error"] < 1e-5 * report["weight_grad_scale"]


def test_under_tensor_parallelism_the_inherited_backward_all_reduces_the_input_gradient(tmp_path):
    out = tmp_path / "tp2.json"
    torchrun(SCRIPTS / "onednn_forward_tp2.py", 2, [str(out)], timeout=180,
             env={onednn_training.FORWARD_VARIABLE: "1"})
    r = read_json(out)
    assert r["onednn_calls"] == 2  # both shards' forwards (fc1 512 x 512, fc2 512 x 512 per rank)
    assert r["output_max"] > 1 and r["output_diff"] <= 1e-5
    # Without the all-reduce each rank would keep only its shard's part of the input gradient.
    assert r["input_grad_max"] > 1 and r["input_grad_diff"] <= 1e-5
    assert r["weight_grad_max"] > 1 and max(r["fc1_grad_diff"], r["fc2_grad_diff"]) <= 1e-6 * r["weight_grad_max"]


@pytest.mark.parametrize(("capability", "vendor", "onednn"), [
    ("AVX512", "AuthenticAMD", True),  # oneDNN's AVX-512 GEMM won there (docs/performance.md item 15)
    ("AVX512", "GenuineIntel", False),  # MKL's AVX-512 code: it won per GEMM, a step showed no difference
    ("AVX2", "AuthenticAMD", False),  # MKL won per GEMM and per step (item 18)
    ("AVX2", "GenuineIntel", False),
    ("DEFAULT", "", False),
])
def test_onednn_takes_the_forward_only_on_cpus_with_avx512_that_mkl_does_not_use(capability, vendor, onednn):
    assert onednn_training.onednn_beats_mkl(capability, vendor) is onednn


_CHOICE_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from megatron_grm.parallel import ParallelLayout, init_parallel, onednn_training
    init_parallel(ParallelLayout())
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import TransformerConfig
    config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=8, use_cpu_initialization=True)
    layer = layers.ColumnParallelLinear(512, 768, config=config, init_method=torch.nn.init.xavier_normal_,
                                        bias=False, gather_output=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(torch.randn(16, 2, 512))
    print(json.dumps({"installed": onednn_training.installed(),
                      "onednn_in_forward": "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()},
                      "rule": onednn_training.onednn_beats_mkl(torch.backends.cpu.get_cpu_capability(),
                                                               onednn_training.cpu_vendor()),
                      "reinstalled": onednn_training.install(cuda=False)}))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA processes keep Megatron's matmul")
@pytest.mark.parametrize("variable", [None, "0"])
def test_init_parallel_follows_this_cpus_rule_unless_the_variable_says_otherwise(variable):
    """Unset: this CPU's rule decides, and the forward runs what ``installed`` says; "0": torch's matmul."""
    name = onednn_training.FORWARD_VARIABLE
    setting = "" if variable is None else f"import os; os.environ[{name!r}] = {variable!r}\n"
    report = python_json(setting + _CHOICE_SCRIPT)
    expected = report["rule"] if variable is None else False
    assert report["installed"] is expected and report["onednn_in_forward"] is expected
    assert report["reinstalled"] is expected


@pytest.fixture(params=["torch's matmul", "oneDNN"])
def widened_classes(request, monkeypatch):
    """(Megatron's function, ours widening bf16 layers), their fp32 forward GEMM on ``request.param``."""
    from megatron.core.tensor_parallel import layers

    wgrad_gemm.install(cuda=False)
    before = layers.LinearWithGradAccumulationAndAsyncCommunication
    monkeypatch.setenv(onednn_training.FORWARD_VARIABLE, "1" if request.param == "oneDNN" else "0")
    monkeypatch.setenv(onednn_training.WIDEN_VARIABLE, "1")  # on any CPU
    monkeypatch.setattr(sdpa_attention, "widen_bf16", sdpa_attention.widen_bf16)  # install sets it
    onednn_training.install(cuda=False)
    assert onednn_training.widening()
    ours = layers.LinearWithGradAccumulationAndAsyncCommunication
    yield ours.megatrons, ours
    layers.LinearWithGradAccumulationAndAsyncCommunication = before


def _bf16_step(function, weight, bias, x, residual, fusion: bool):
    """:func:`_step` for bf16 operands, with every GEMM's operand dtypes recorded, backward included."""
    weight = torch.nn.Parameter(weight.clone())
    if fusion:
        weight.main_grad = torch.ones(weight.shape)  # fp32, as DDP's buffer for a bf16 parameter
    bias = None if bias is None else torch.nn.Parameter(bias.clone())
    x = x.clone().requires_grad_()
    with GemmDtypes() as seen:
        out = function.apply(x, weight, bias, fusion, *FUNCTION_ARGS)
        out.add_(residual)
        out.float().square().sum().backward()
    weight_grad = weight.main_grad if fusion else weight.grad
    return (out.detach(), x.grad, weight_grad, None if bias is None else bias.grad), seen


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_widened_bf16_layer_multiplies_fp32_copies_and_gives_megatrons_bf16_results(widened_classes, fusion,
                                                                                       with_bias):
    megatrons, ours = widened_classes
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(640, 512, generator=g) * 0.05).bfloat16()
    x, residual = torch.randn(7, 3, 512, generator=g).bfloat16(), torch.randn(7, 3, 640, generator=g).bfloat16()
    bias = torch.randn(640, generator=g).bfloat16() if with_bias else None

    want, megatron_gemms = _bf16_step(megatrons, weight, bias, x, residual, fusion)
    got, our_gemms = _bf16_step(ours, weight, bias, x, residual, fusion)

    assert megatron_gemms.with_dtype(torch.bfloat16)  # the check sees Megatron's bf16 GEMMs ...
    assert len(our_gemms.calls) >= 2 and not our_gemms.with_dtype(torch.bfloat16)  # ... and none of ours
    # float64 on the same bf16 values: the output within its three bf16 roundings (GEMM, bias, residual: each
    # within 2^-8 of what it rounds) of the exact one; each gradient, from that side's own output, the exact
    # one rounded once (fp32 sums aside)
    gemm = x.double() @ weight.double().t()
    parts = gemm.abs() + residual.double().abs() + (0 if bias is None else bias.double().abs())
    exact_output = gemm + residual.double() + (0 if bias is None else bias.double())
    for side in (got, want):
        grad_out = 2 * side[0].double()
        exact = {"output": exact_output, "input grad": grad_out @ weight.double(),
                 "weight grad": grad_out.reshape(-1, 640).t() @ x.double().reshape(-1, 512) + (1 if fusion else 0),
                 "bias grad": grad_out.reshape(-1, 640).sum(0) if with_bias else None}
        for (name, reference), result in zip(exact.items(), side):
            if reference is None:
                assert result is None, name
                continue
            fp32_sum = name == "weight grad" and fusion  # accumulated into the fp32 main_grad, not rounded to bf16
            assert result.dtype == (torch.float32 if fp32_sum else torch.bfloat16), name
            scale = reference.abs().max().item()
            error = (result.double() - reference).abs()
            bound = (2 ** -6 * parts if name == "output" else 1e-4 * scale if fp32_sum
                     else 2 ** -8 * reference.abs() + 1e-4 * scale)
            assert (error <= bound).all(), f"{name}: {(error - bound).max().item()} over"


def test_the_sdpa_cores_bf16_attention_widens_with_the_linear_layers(monkeypatch):
    """install sets ``sdpa_attention.widen_bf16`` to what it does for the linear layers: the variable's
    choice on the CPU, never in a CUDA process (models/test_sdpa_attention.py tests the widened attention)."""
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "LinearWithGradAccumulationAndAsyncCommunication",
                        layers.LinearWithGradAccumulationAndAsyncCommunication)  # restored after the test
    monkeypatch.setattr(sdpa_attention, "widen_bf16", sdpa_attention.widen_bf16)
    for setting, cuda, widens in (("1", False, True), ("0", False, False), ("1", True, False)):
        monkeypatch.setenv(onednn_training.WIDEN_VARIABLE, setting)
        onednn_training.install(cuda=cuda)
        assert sdpa_attention.widen_bf16 is onednn_training.widening() is widens, (setting, cuda)


def test_bf16_layers_widen_where_the_cpu_has_no_bf16_arithmetic_unless_the_variable_says_otherwise(monkeypatch):
    monkeypatch.delenv(onednn_training.WIDEN_VARIABLE, raising=False)
    native = onednn_linear.cpu_multiplies_bf16() and onednn_linear.available(torch.bfloat16)
    assert onednn_training.widens_here()[0] is not native  # bf16 stays bf16 only where oneDNN runs it natively
    for setting, widens in (("1", True), ("0", False)):
        monkeypatch.setenv(onednn_training.WIDEN_VARIABLE, setting)
        assert onednn_training.widens_here() == (widens, f"{onednn_training.WIDEN_VARIABLE}={setting}")


_WIDENED_STEP_SCRIPT = textwrap.dedent("""
    import json
    import os
    import torch
    from megatron_grm.parallel import ParallelLayout, init_parallel, onednn_training
    from tests.gemm_dtypes import GemmDtypes
    os.environ[onednn_training.WIDEN_VARIABLE] = "1"  # on any CPU
    init_parallel(ParallelLayout())
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import TransformerConfig
    config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=8, use_cpu_initialization=True,
                               params_dtype=torch.bfloat16, bf16=True, gradient_accumulation_fusion=True)
    layer = layers.ColumnParallelLinear(512, 768, config=config, init_method=torch.nn.init.xavier_normal_,
                                        bias=False, gather_output=False)
    layer.weight.main_grad = torch.zeros(layer.weight.shape)  # as Megatron's DDP sets a bf16 parameter up
    layer.weight.grad_added_to_main_grad = False
    x = torch.randn(16, 2, 512, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    with GemmDtypes() as seen:
        out, _ = layer(x)
        (out.float() ** 2).sum().backward()
    want = x.detach().double() @ layer.weight.detach().double().t()
    want_grad = 2 * out.detach().double().reshape(-1, 768).t() @ x.detach().double().reshape(-1, 512)
    print(json.dumps({
        "widening": onednn_training.widening(),
        "gemms": len(seen.calls), "bf16_gemms": seen.with_dtype(torch.bfloat16),
        "output_dtype": str(out.dtype), "input_grad_dtype": str(x.grad.dtype),
        "output_error": (out.double() - want).abs().max().item(), "output_scale": want.abs().max().item(),
        "weight_grad_error": (layer.weight.main_grad.double() - want_grad).abs().max().item(),
        "weight_grad_scale": want_grad.abs().max().item(),
        "flagged_for_ddp": layer.weight.grad_added_to_main_grad,
        "dummy_grad_dtype": str(layer.weight.grad.dtype),
    }))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA processes keep Megatron's matmul")
def test_init_parallel_widens_a_bf16_column_parallel_linear_into_main_grad():
    r = python_json(_WIDENED_STEP_SCRIPT)
    assert r["widening"] and r["gemms"] >= 3 and r["bf16_gemms"] == []  # forward, input and weight gradients
    assert r["output_dtype"] == r["input_grad_dtype"] == r["dummy_grad_dtype"] == "torch.bfloat16"
    assert r["output_error"] <= 2 ** -8 * r["output_scale"]
    assert r["flagged_for_ddp"]  # DDP's hook then leaves the dummy .grad alone
    assert r["weight_grad_error"] <= 1e-5 * r["weight_grad_scale"]


def test_under_tensor_parallelism_a_widened_bf16_mlp_all_reduces_its_input_gradient(tmp_path):
    out = tmp_path / "tp2_bf16.json"
    torchrun(SCRIPTS / "onednn_forward_tp2.py", 2, [str(out), "bf16"], timeout=180,
             env={onednn_training.WIDEN_VARIABLE: "1"})
    r = read_json(out)
    assert r["gemms"] >= 6 and r["bf16_gemms"] == 0  # two forwards, four gradients per rank
    # bf16 results: within a few roundings of float64 on the same bf16 values
    assert r["output_max"] > 1 and r["output_diff"] <= 2 ** -6 * r["output_max"]
    # Without the all-reduce each rank would keep only its shard's part of the input gradient.
    assert r["input_grad_max"] > 1 and r["input_grad_diff"] <= 2 ** -6 * r["input_grad_max"]
    assert r["weight_grad_max"] > 1 and max(r["fc1_grad_diff"], r["fc2_grad_diff"]) <= 2 ** -6 * r["weight_grad_max"]
