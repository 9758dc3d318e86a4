"""parallel/grad_zeroing.py: the weight-gradient GEMM overwrites ``main_grad`` on a step's first micro-batch
instead of Megatron zeroing the whole buffer first; what no GEMM writes is zeroed as before."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_grm.parallel import grad_zeroing, wgrad_gemm
from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "grad_zeroing_check.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grad_zeroing") / "report.json"
    torchrun(SCRIPT, 1, [str(out)], timeout=180)
    return read_json(out)


def _assert_gradients_match(step: dict) -> None:
    for name, diff in step["max_diff"].items():
        assert math.isfinite(diff), name
        assert diff <= 1e-5 * max(step["norms"][name], 1.0), name


def test_only_megatrons_own_gemm_weights_skip_the_zeroing(report):
    # The subclass with its own forward and the scale get their gradient through .grad: zeroed as before.
    assert report["overwritten"] == ["a.weight", "b.weight"]
    assert 0.0 < report["zeroed_fraction"] < 1.0
    assert report["disabled"] == {"overwritten": 0, "megatrons_reset": True}


def test_two_micro_batches_sum_as_with_a_zeroed_buffer(report):
    step = report["step1"]
    assert step["unwritten"] == [] and step["norms"]["a.weight"] > 0
    _assert_gradients_match(step)


def test_a_stale_or_nan_gradient_is_overwritten_and_an_unused_weight_zeroed(report):
    step = report["step2"]
    # Zeroing left the GEMM weights' last gradients in place (the point), zeroed the rest.
    assert step["kept_after_zeroing"] == {"a.weight": True, "b.weight": True, "custom.weight": False, "scale": False}
    # a's main_grad held NaN before the backward; b got no gradient and is zeroed before DDP's finalize.
    assert step["unwritten"] == ["b.weight"] and step["b_grad_norm"] == 0.0
    assert step["norms"]["a.weight"] > 0
    _assert_gradients_match(step)
    assert report["finalize_calls"] == 2  # Megatron's finalize still ran, after the sweep, each step


def test_the_kernel_overwrites_once_then_adds():
    g = torch.Generator().manual_seed(0)
    total_input, grad_output = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    product = grad_output.t() @ total_input
    main_grad = torch.full((3, 4), float("nan"))
    wgrad_gemm.mark_overwrite(main_grad)
    wgrad_gemm.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad, product)
    wgrad_gemm.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)  # the mark was taken: adds
    torch.testing.assert_close(main_grad, 2 * product)
    assert not wgrad_gemm.take_overwrite(main_grad)


def test_spans_left_to_zero_cover_everything_but_the_skipped_weights():
    assert grad_zeroing._spans_to_zero(10, [(6, 8), (0, 2)]) == [(2, 6), (8, 10)]
    assert grad_zeroing._spans_to_zero(4, [(0, 4)]) == []
    assert grad_zeroing._spans_to_zero(3, []) == [(0, 3)]
