"""GPU only: the Trainer on host-collated micro-batches (what every stage's producer yields), 3 steps and a
checkpoint, in fp32 and in bf16 (what GPU runs use), with the embedding gradient added straight into main_grad.

The producers collate on the CPU; the Trainer moves each micro-batch to the model's device. Without that,
every stage failed at its first forward on a GPU while all CPU tests passed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_grm.parallel.wgrad_gemm import mixed_precision_gemm_available
from tests.conftest import one_gpu_env, read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "probe_train.py"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_takes_host_batches_on_a_gpu(tmp_path, precision):
    out = tmp_path / "gpu.json"
    torchrun(SCRIPT, 1, ["--run-dir", str(tmp_path / "run"), "--steps", "3", "--precision", precision,
                         "--save-interval", "3", "--out", str(out)], env=one_gpu_env())
    got = read_json(out)
    assert got["error"] is None and got["step"] == 3
    assert got["skipped"] == [False, False, False]
    assert all(math.isfinite(x) for x in got["losses"]) and all(math.isfinite(g) for g in got["grad_norms"])
    assert len(set(got["losses"])) == 3  # three different batches, three updates
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    # The embedding lookup added its rows into main_grad on the GPU (index_add_, parallel/embedding_grad.py),
    # the 17 linear weights theirs inside the GEMM (apex's kernel, or parallel/wgrad_gemm.py on torch >= 2.8).
    assert got["embedding_in_main_grad"] is True
    if mixed_precision_gemm_available():
        assert got["wgrad_fusion"] is True
    assert got["weights_accumulated_in_main_grad"] == (18 if got["wgrad_fusion"] else 1)
