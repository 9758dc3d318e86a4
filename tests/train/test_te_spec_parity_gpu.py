"""GPU only: the Transformer Engine layer spec computes what the local spec computes, on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import one_gpu_env, read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "te_parity.py"


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-3), ("bf16", 5e-2)])
def test_te_spec_forward_backward_matches_local_spec(tmp_path, dtype, tol):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    out = tmp_path / "te.json"
    # TE runs fp32 GEMMs in TF32 unless cuBLAS is told otherwise; compare the specs, not TF32's rounding.
    torchrun(SCRIPT, 1, ["--out", str(out), "--dtype", dtype],
             env={**one_gpu_env(), "NVIDIA_TF32_OVERRIDE": "0"})
    got = read_json(out)
    assert got["max_abs_logit_diff"] < tol
    assert got["loss_te"] == pytest.approx(got["loss_local"], rel=tol)
    assert got["grad_norm_te"] == pytest.approx(got["grad_norm_local"], rel=10 * tol)
