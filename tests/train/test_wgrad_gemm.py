"""parallel/wgrad_gemm.py: apex's ``fused_weight_gradient_mlp_cuda`` contract on torch GEMMs, the weight
gradient added into ``main_grad`` inside the GEMM. On CPU, and on a GPU with bf16 operands into an fp32
``main_grad`` (cuBLAS's mixed-precision GEMM, fp32 accumulation as apex's kernel)."""

from __future__ import annotations

import pytest
import torch

from megatron_grm.parallel import wgrad_gemm


def _operands(device: str, dtype: torch.dtype, tokens: int = 96, n_in: int = 48, n_out: int = 40):
    g = torch.Generator().manual_seed(0)
    total_input = torch.randn(tokens, n_in, generator=g).to(device, dtype)
    grad_output = torch.randn(tokens, n_out, generator=g).to(device, dtype)
    start = torch.randn(n_out, n_in, generator=g).to(device)  # what earlier micro-batches accumulated
    return total_input, grad_output, start


def _accumulated_twice(device: str, dtype: torch.dtype):
    total_input, grad_output, start = _operands(device, dtype)
    main_grad = start.clone()
    pointer = main_grad.data_ptr()
    for _ in range(2):
        wgrad_gemm.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    want = start.double() + 2 * grad_output.double().t() @ total_input.double()
    assert main_grad.dtype == torch.float32 and main_grad.data_ptr() == pointer  # in place, fp32 kept
    return main_grad.double(), want, grad_output, total_input


def test_adds_the_weight_gradient_into_main_grad_on_cpu():
    got, want, *_ = _accumulated_twice("cpu", torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_install_makes_megatrons_linears_fuse_through_it():
    from megatron.core.tensor_parallel import layers

    kernel = wgrad_gemm.install(cuda=False)
    assert layers._grad_accum_fusion_available
    assert kernel == wgrad_gemm.kernel_in_use()
    if kernel.startswith("torch"):  # no apex here: Megatron's linears call this module
        assert layers.fused_weight_gradient_mlp_cuda is wgrad_gemm


@pytest.mark.gpu
def test_bf16_operands_accumulate_in_fp32_on_a_gpu():
    assert wgrad_gemm.mixed_precision_gemm_available()
    got, want, grad_output, total_input = _accumulated_twice("cuda", torch.bfloat16)
    error = (got - want).abs().max().item()
    # The unfused path rounds each micro-batch's weight gradient to bf16 before adding it.
    rounded = (grad_output.t() @ total_input).double()
    rounded_error = (2 * rounded - 2 * grad_output.double().t() @ total_input.double()).abs().max().item()
    print(f"max error fused {error:.2e}, bf16-rounded gradient {rounded_error:.2e}")
    assert error < 1e-3
    assert error < rounded_error / 10


@pytest.mark.gpu
def test_a_marked_main_grad_is_overwritten_by_the_mixed_precision_gemm():
    """parallel/grad_zeroing.py's mark on a GPU: beta 0 in cuBLAS's bf16-into-fp32 GEMM, NaN not read."""
    total_input, grad_output, _ = _operands("cuda", torch.bfloat16)
    main_grad = torch.full((grad_output.shape[1], total_input.shape[1]), float("nan"), device="cuda")
    wgrad_gemm.mark_overwrite(main_grad)
    wgrad_gemm.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    want = grad_output.double().t() @ total_input.double()
    assert (main_grad.double() - want).abs().max().item() < 1e-3
