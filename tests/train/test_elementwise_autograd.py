"""CPU training's RMSNorm, SwiGLU and RoPE on the C++ passes, forward and backward
(parallel/elementwise_autograd.py, csrc/elementwise.cpp's backward passes, models/rms_norm.py): the gradients
against float64 autograd on shapes on and off the vector width, one thread and two; RoPE against Megatron's
own function to the bit; torch's ops where the passes do not apply; and a model built for training with
every norm on them and the same loss and gradients as torch's ops give."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_grm.models.rms_norm import RMSNorm
from megatron_grm.models.swiglu import swiglu
from megatron_grm.parallel import cpu_decode_kernel, elementwise_autograd
from tests.conftest import python_json
from tests.rollout.test_cpu_decode_kernel import fresh_probe, needs_compiler  # noqa: F401 (a fixture)

pytestmark = needs_compiler

# [rows..., channels]: a few rows off the vector width (one thread), and enough rows that the passes split
# them between threads (past 2^15 elements), as a training micro-batch's do.
SHAPES = [(3, 2, 37), (5, 1, 16), (256, 2, 96), (700, 1, 64)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _float64_swiglu_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x64 = x.double().requires_grad_(True)
    gate, up = x64.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad.double())
    return x64.grad


def _float64_norm_grads(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    F.rms_norm(x64, (x.shape[-1],), w64, eps).backward(grad.double())
    return x64.grad, w64.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_backward_matches_float64(shape, threads):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4
    grad = torch.randn(shape, generator=g)
    got = cpu_decode_kernel.swiglu_backward(x, grad)
    want = _float64_swiglu_grad(x, grad)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_swiglu_backward_at_extreme_gates_and_checks_its_gradient():
    """The sigmoid comes from exp(-|gate|): gates of ±1e4 neither overflow nor turn into NaN."""
    gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, -0.0, 1e-3, 20.0, 88.0, 100.0, 1e4])
    x = torch.cat((gate, torch.full_like(gate, 1.5)))[None]
    grad = torch.full((1, gate.numel()), 0.75)
    got = cpu_decode_kernel.swiglu_backward(x, grad)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _float64_swiglu_grad(x, grad), rtol=1e-5, atol=1e-30)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_decode_kernel.swiglu_backward(x, grad[:, :-1])


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_backward_matches_float64(shape, threads):
    g = torch.Generator().manual_seed(sum(shape) + 3)
    x, w = torch.randn(shape, generator=g) * 3, torch.rand(shape[-1], generator=g) + 0.5
    grad = torch.randn(shape, generator=g)
    got_x, got_w = cpu_decode_kernel.rms_norm_backward(x, w, grad, 1e-5)
    want_x, want_w = _float64_norm_grads(x, w, grad, 1e-5)
    assert got_x.dtype == got_w.dtype == torch.float32 and got_x.shape == x.shape and got_w.shape == w.shape
    torch.testing.assert_close(got_x.double(), want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-5 * want_w.abs().max().item())


def test_rms_norm_backward_checks_its_operands():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_decode_kernel.rms_norm_backward(x, torch.ones(7), torch.randn(4, 8), 1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_decode_kernel.rms_norm_backward(x, torch.ones(8), torch.randn(4, 7), 1e-5)
    with pytest.raises(ValueError, match="input's dtype"):
        cpu_decode_kernel.rms_norm_backward(x, torch.ones(8).bfloat16(), torch.randn(4, 8), 1e-5)


def test_bf16_backward_passes_are_within_one_rounding_of_float64():
    """bf16: computed in fp32 and rounded once, so each element within one bf16 step of the exact value
    (torch's bf16 autograd rounds after every op, and lands further off)."""
    g = torch.Generator().manual_seed(5)
    x, grad = (torch.randn(300, 2 * 48, generator=g) * 3).bfloat16(), torch.randn(300, 48, generator=g).bfloat16()
    want = _float64_swiglu_grad(x, grad)
    got = cpu_decode_kernel.swiglu_backward(x, grad)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-30).all()
    x, w, grad = (torch.randn(300, 48, generator=g).bfloat16(), (torch.rand(48, generator=g) + 0.5).bfloat16(),
                  torch.randn(300, 48, generator=g).bfloat16())
    got_x, got_w = cpu_decode_kernel.rms_norm_backward(x, w, grad, 1e-5)
    want_x, want_w = _float64_norm_grads(x, w, grad, 1e-5)
    assert got_x.dtype == torch.bfloat16 and got_w.dtype == torch.float32
    assert ((got_x.double() - want_x).abs() <= want_x.abs() * 2.0 ** -8 + 1e-6).all()
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-4)


def _grad_fn(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


def test_swiglu_trains_through_the_kernels_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 2 * 96, generator=g) * 3).requires_grad_(True)
    grad = torch.randn(64, 2, 96, generator=g)
    y = swiglu(x)
    assert _grad_fn(y) == "KernelSwiGLUBackward"
    y.backward(grad)
    gate, up = x.detach().double().chunk(2, dim=-1)
    torch.testing.assert_close(y.detach().double(), F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), _float64_swiglu_grad(x.detach(), grad), rtol=1e-5, atol=1e-6)
    assert _grad_fn(swiglu(x.detach().double().requires_grad_(True))) == "_SwiGLUBackward"  # float64: torch's


@pytest.mark.parametrize("eps", [1e-5, None])
def test_rms_norm_module_trains_through_the_kernels_and_falls_back(eps):
    config = SimpleNamespace(normalization="RMSNorm")
    norm = RMSNorm(config, 96, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
    reference = torch.nn.RMSNorm(96, eps=eps)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(128, 2, 96, generator=torch.Generator().manual_seed(2)) * 2
    grad = torch.randn(128, 2, 96, generator=torch.Generator().manual_seed(3))
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = norm(ours)
    assert _grad_fn(out) == "KernelRMSNormBackward"
    out.backward(grad)
    want = reference(theirs)
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)
    # Torch's ops: another dtype, or an input whose dtype differs from the weight's (torch's mixed-dtype norm).
    assert _grad_fn(norm.double()(x.double().requires_grad_(True))) != "KernelRMSNormBackward"
    mixed = RMSNorm(config, 96, eps=eps)
    assert _grad_fn(mixed(x.bfloat16().requires_grad_(True))) != "KernelRMSNormBackward"


def test_rms_norm_refuses_what_megatrons_torch_norm_refuses():
    with pytest.raises(ValueError, match="sequence_parallel"):
        RMSNorm(SimpleNamespace(normalization="RMSNorm", sequence_parallel=True), 8)
    with pytest.raises(ValueError, match="normalization='LayerNorm'"):
        RMSNorm(SimpleNamespace(normalization="LayerNorm"), 8)
    assert RMSNorm(SimpleNamespace(normalization="RMSNorm"), 8).state_dict().keys() == {"weight"}


@pytest.mark.usefixtures("fresh_probe")
def test_without_the_library_training_runs_torchs_ops(monkeypatch):
    monkeypatch.setenv(cpu_decode_kernel.DISABLE_VARIABLE, "0")
    x = torch.randn(4, 2, 16, requires_grad=True)
    assert not elementwise_autograd.takes(x)
    assert _grad_fn(swiglu(x)) == "_SwiGLUBackward"
    assert _grad_fn(RMSNorm(SimpleNamespace(normalization="RMSNorm"), 16)(x)) != "KernelRMSNormBackward"


def _megatrons_rope():
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    function = rope_utils._apply_rotary_pos_emb_bshd
    return getattr(function, "megatrons", function)  # installed already where this process ran init_parallel


def _angle_table(s: int, rot: int, interleaved: bool, seed: int) -> torch.Tensor:
    """Megatron's RotaryEmbedding layout: each angle for the two channels it rotates."""
    f = torch.rand(s, 1, 1, rot // 2, generator=torch.Generator().manual_seed(seed)) * 20
    return torch.stack((f, f), dim=-1).view(s, 1, 1, rot) if interleaved else torch.cat((f, f), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [64, 32])  # every channel, or half of them passed through
def test_rope_equals_megatrons_to_the_bit_forward_and_backward(dtype, interleaved, rot, threads):
    """Queries as Megatron hands them over: a strided view of the fused QKV projection's output."""
    megatrons = _megatrons_rope()
    ours = elementwise_autograd._kernel_rope(megatrons)
    s, b, heads, d = 40, 3, 4, 64
    g = torch.Generator().manual_seed(rot + interleaved)
    mixed = (torch.randn(s, b, 3 * heads * d, generator=g) * 2).to(dtype)
    freqs = _angle_table(s, rot, interleaved, seed=rot)
    grad = torch.randn(s, b, heads, d, generator=g).to(dtype)
    results = []
    for function in (megatrons, ours):
        x = mixed.clone().requires_grad_(True)
        query = x.view(s, b, 3, heads, d)[:, :, 0]
        y = function(query, freqs, interleaved)
        y.backward(grad)
        results.append((y, x.grad, type(y.grad_fn).__name__))
    (want, want_grad, _), (got, got_grad, kind) = results
    assert kind == "KernelRoPEBackward"
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_rope_trains_after_a_rollout_used_the_same_angle_table_in_inference_mode():
    """Megatron caches its RoPE table per length: a GRPO step can meet the table a rollout's inference-mode
    forward rotated with, and cos/sin made in inference mode cannot be saved for a backward."""
    megatrons = _megatrons_rope()
    ours = elementwise_autograd._kernel_rope(megatrons)
    freqs = _angle_table(8, 16, False, seed=2)
    with torch.inference_mode():
        ours(torch.randn(8, 2, 2, 16), freqs, False)
    x = torch.randn(8, 2, 2, 16, requires_grad=True)
    y = ours(x, freqs, False)
    assert type(y.grad_fn).__name__ == "KernelRoPEBackward"
    y.sum().backward()
    want = x.detach().clone().requires_grad_(True)
    megatrons(want, freqs, False).sum().backward()
    assert torch.equal(x.grad, want.grad)


def test_rope_keeps_megatrons_function_where_the_kernel_does_not_apply():
    megatrons = _megatrons_rope()
    ours = elementwise_autograd._kernel_rope(megatrons)
    x = torch.randn(8, 2, 2, 16, requires_grad=True)
    freqs = _angle_table(8, 16, False, seed=1)
    distinct = torch.rand(8, 1, 1, 16)  # halves that differ: not a table the kernel's half-width angles describe
    cases = {
        "distinct halves": (x, distinct, {}),
        "multi-latent attention": (x, freqs, {"multi_latent_attention": True}),
        "float64": (x.double(), freqs.double(), {}),
    }
    for name, (t, f, extra) in cases.items():
        got = ours(t, f, False, **extra)
        assert type(got.grad_fn).__name__ != "KernelRoPEBackward", name
        want = megatrons(t, f, False, **extra)
        assert torch.equal(got, want), name
    assert type(ours(x, freqs, False).grad_fn).__name__ == "KernelRoPEBackward"


_MODEL = """
import json
import torch
import megatron.core.models.common.embeddings.rope_utils as rope_utils
from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.models.provider import build_model
from megatron_grm.models.rms_norm import RMSNorm
from megatron_grm.parallel import elementwise_autograd
from megatron_grm.parallel.distributed import ParallelLayout, init_parallel
init_parallel(ParallelLayout())
cfg = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                  num_query_groups=2, vocab_size=128, max_position_embeddings=64)
model = build_model(cfg, ParallelLayout(), PrecisionConfig(), use_te=False)
norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.RMSNorm)]
tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
positions = torch.arange(24)[None].expand(2, 24)

def loss_and_grads():
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 128)[:-1], tokens.reshape(-1)[1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

fused_loss, fused = loss_and_grads()
takes = elementwise_autograd.takes
elementwise_autograd.takes = lambda x, weight=None: False
torch_loss, plain = loss_and_grads()
elementwise_autograd.takes = takes
print(json.dumps({
    "norms": norms, "ours": [n for n, m in model.named_modules() if type(m) is RMSNorm],
    "rope_installed": hasattr(rope_utils._apply_rotary_pos_emb_bshd, "megatrons"),
    "fused_loss": fused_loss, "torch_loss": torch_loss,
    "grad_error": max(((fused[n] - plain[n]).abs().max() / plain[n].abs().max().clamp(min=1e-12)).item()
                      for n in plain),
    "norm_grads": [n for n in plain if "layernorm" in n and plain[n].abs().sum() > 0],
}))
"""


def test_a_cpu_training_model_has_every_norm_on_the_kernels_and_torchs_gradients():
    """build_model's local spec on the CPU: the layers' two norms and the final one are ours (Megatron
    builds the final norm from its own default unless the block's spec names it), init_parallel put RoPE
    on the kernel, and a training step's loss and every parameter's gradient agree with torch's ops on the
    same model."""
    report = python_json(_MODEL)
    assert report["rope_installed"]
    assert report["norms"] == report["ours"] and len(report["norms"]) == 2 * 2 + 1
    assert "decoder.final_layernorm" in report["ours"]
    assert abs(report["fused_loss"] - report["torch_loss"]) < 1e-5
    assert report["grad_error"] < 1e-4
    assert len(report["norm_grads"]) == 5


def test_the_trainer_switch_turns_the_passes_off_and_on(caplog):
    """``trainer.cpu_elementwise_kernels``: off, torch's and Megatron's ops (the demo's validated round-off
    path); on by default, except in the demo's configs. A CPU trainer's log says which path runs."""
    from megatron_grm.stages.common import load_config
    from megatron_grm.train.config import RunConfig

    x = torch.randn(4, 2, 32, requires_grad=True)
    norm = RMSNorm(SimpleNamespace(normalization="RMSNorm"), 16)
    cpu = torch.device("cpu")
    caplog.set_level(logging.INFO, logger=elementwise_autograd.__name__)
    try:
        elementwise_autograd.enable(False, cpu)
        assert not elementwise_autograd.takes(x)
        assert _grad_fn(swiglu(x)) == "_SwiGLUBackward"
        assert _grad_fn(norm(x[..., :16])) != "KernelRMSNormBackward"
        assert caplog.messages[-1] == ("RMSNorm, SwiGLU and RoPE in training: torch's and Megatron's ops "
                                       "(trainer.cpu_elementwise_kernels=false)")
    finally:
        elementwise_autograd.enable(True, cpu)
    assert caplog.messages[-1] == ("RMSNorm, SwiGLU and RoPE in training: C++ passes forward and backward "
                                   "(parallel/elementwise_autograd.py)")
    assert _grad_fn(swiglu(x)) == "KernelSwiGLUBackward"
    logged = len(caplog.messages)
    elementwise_autograd.enable(True, torch.device("meta"))  # not a CPU trainer: nothing to say
    assert len(caplog.messages) == logged
    switch = {(name, tuple(extra)): RunConfig.from_dict(load_config(name, extra)).trainer.cpu_elementwise_kernels
              for name, extra in [("sft", []), ("rft", []), ("grpo", []), ("metarm", []), ("bootstrap", []),
                                  ("rft", ["+experiment=rft_tiny"]), ("grpo", ["+experiment=grpo_tiny"]),
                                  ("metarm", ["+experiment=metarm_tiny"])]}
    assert [on for (name, extra), on in switch.items()] == [True] * 4 + [False] * 4, switch
