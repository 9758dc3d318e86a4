"""TP=2, PP=2 and DP=2 (distributed optimizer) train exactly like one process on the same weights and batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "probe_train.py"


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init")
    torchrun(SCRIPT, 1, ["--run-dir", str(root), "--save-init", "--out", str(root / "out.json")])
    return root / "checkpoints" / "iter_0000000"


def _train(tmp: Path, name: str, nproc: int, init: Path | None, extra: list[str]) -> dict:
    out = tmp / f"{name}.json"
    init_args = ["--init", str(init)] if init is not None else []
    torchrun(SCRIPT, nproc, ["--run-dir", str(tmp / name), *init_args, "--out", str(out), *extra])
    return read_json(out)


@pytest.fixture(scope="module")
def reference(init_ckpt, tmp_path_factory) -> dict:
    """TP=1, PP=1, DP=1: global batch 8 = 4 micro-batches of 2."""
    return _train(tmp_path_factory.mktemp("ref"), "ref", 1, init_ckpt, ["--steps", "3"])


def _assert_same_training(got: dict, want: dict) -> None:
    assert len(got["losses"]) == len(want["losses"]) == 3
    assert got["losses"] == pytest.approx(want["losses"], abs=1e-5, rel=0)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], abs=1e-5, rel=0)
    # The weights moved: the comparison is over real optimizer steps, not a frozen model.
    assert want["losses"][0] != want["losses"][2]


def test_tp2_loss_and_grad_norm_equal_tp1(init_ckpt, reference, tmp_path):
    _assert_same_training(_train(tmp_path, "tp2", 2, init_ckpt, ["--tp", "2", "--steps", "3"]), reference)


def test_pp2_with_4_microbatches_equals_pp1(init_ckpt, reference, tmp_path):
    _assert_same_training(_train(tmp_path, "pp2", 2, init_ckpt, ["--pp", "2", "--steps", "3"]), reference)


def test_dp2_distributed_optimizer_equals_dp1_with_twice_the_microbatches(init_ckpt, reference, tmp_path):
    # DP=2: each rank runs 2 micro-batches of 2; DP=1 ran 4 of 2 for the same global batch of 8.
    got = _train(tmp_path, "dp2", 2, init_ckpt, ["--steps", "3", "--dist-opt", "1"])
    _assert_same_training(got, reference)


def test_weight_gradients_accumulated_inside_the_gemm_train_like_the_unfused_path(init_ckpt, reference, tmp_path):
    """The Trainer's default: Megatron's gradient_accumulation_fusion, each linear's weight-gradient GEMM adding
    straight into DDP's main_grad (parallel/wgrad_gemm.py without apex), and the embedding lookup adding its rows
    there (parallel/embedding_grad.py). Same training as .grad + DDP's hook."""
    unfused = _train(tmp_path, "unfused", 1, init_ckpt, ["--steps", "3", "--wgrad-fusion", "0"])
    assert reference["wgrad_fusion"] is True and unfused["wgrad_fusion"] is False
    # 4 layers x (QKV, projection, fc1, fc2) + the output layer took the fused GEMM, the embedding table its
    # row-wise add; none did unfused.
    assert reference["weights_accumulated_in_main_grad"] == 18 and reference["embedding_in_main_grad"] is True
    assert unfused["weights_accumulated_in_main_grad"] == 0 and unfused["embedding_in_main_grad"] is False
    _assert_same_training(unfused, reference)


def test_fused_adam_kernel_trains_like_megatrons_foreach_adam(init_ckpt, reference, tmp_path):
    """Without TE/apex Megatron builds torch AdamW (foreach); the Trainer switches it to torch's fused
    kernel (parallel/fused_adam.py). Same updates, within float round-off."""
    foreach = _train(tmp_path, "foreach", 1, init_ckpt, ["--steps", "3", "--fused-adam", "0"])
    assert reference["fused_adam"] and all(flag is True for flag in reference["fused_adam"])
    assert foreach["fused_adam"] and not any(foreach["fused_adam"])
    _assert_same_training(foreach, reference)
    assert foreach["weight_sums"] == pytest.approx(reference["weight_sums"], abs=1e-4, rel=0)


def test_output_layer_on_loss_tokens_only_trains_like_projecting_every_position(init_ckpt, reference, tmp_path):
    """trainer.loss_tokens_only (the default, parallel/loss_positions.py): the output layer and cross-entropy
    see only the response tokens. Same losses, gradients and updates as Megatron's every-position output."""
    full = _train(tmp_path, "every_position", 1, init_ckpt, ["--steps", "3", "--loss-tokens-only", "0"])
    assert full["output_layer_rows"] == 3 * 8 * 32  # 3 steps x 8 sequences x 32 positions
    assert reference["output_layer_rows"] == reference["loss_tokens"] == full["loss_tokens"]
    assert reference["output_layer_rows"] < 0.75 * full["output_layer_rows"]
    _assert_same_training(full, reference)
    assert full["weight_sums"] == pytest.approx(reference["weight_sums"], abs=1e-5, rel=0)


def test_gemms_overwriting_main_grad_train_like_a_zeroed_buffer(init_ckpt, reference, tmp_path):
    """trainer.lazy_grad_zeroing (the default, parallel/grad_zeroing.py): the linears' weight-gradient GEMMs
    overwrite main_grad on a step's first micro-batch (4 here) instead of adding into a zeroed buffer."""
    zeroed = _train(tmp_path, "zeroed", 1, init_ckpt, ["--steps", "3", "--lazy-grad-zeroing", "0"])
    assert reference["overwritten_weights"] == 17 and zeroed["overwritten_weights"] == 0  # 4 x 4 + output layer
    _assert_same_training(zeroed, reference)
    assert zeroed["weight_sums"] == pytest.approx(reference["weight_sums"], abs=1e-6, rel=0)


def test_fused_weight_gradients_keep_the_embedding_gradient_of_a_tied_output_layer(tmp_path):
    """With tied embeddings the shared weight gets the output layer's gradient inside the GEMM and the
    embedding lookup's through .grad; both must reach main_grad (Megatron zeroes the dummy wgrad, and the
    lookup keeps Megatron's path rather than adding its rows into main_grad itself)."""
    fused, unfused = (_train(tmp_path, f"tied{flag}", 1, None, ["--steps", "3", "--tied", "--wgrad-fusion", flag])
                      for flag in ("1", "0"))
    # The shared table counts once: set by the output layer's GEMM.
    assert fused["weights_accumulated_in_main_grad"] == 17 and unfused["weights_accumulated_in_main_grad"] == 0
    # The tied output layer has no weight of its own: the table is zeroed, the 16 layer weights overwritten.
    assert fused["overwritten_weights"] == 16 and unfused["overwritten_weights"] == 0
    _assert_same_training(fused, unfused)
    assert fused["weight_sums"] == pytest.approx(unfused["weight_sums"], abs=1e-4, rel=0)
