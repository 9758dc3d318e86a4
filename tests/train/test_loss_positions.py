"""parallel/loss_positions.py: the output layer projects only the positions the loss reads.

The SFT/RFT trainer with and without it is compared in test_parallel_equivalence.py; here: the
bookkeeping, GRPO's loss/metrics/gradients and the reference/old-policy/rollout log-probabilities under
TP=1, TP=2 and PP=2 (real Trainer, torchrun), and sequence parallelism on Megatron's output layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_grm.parallel.loss_positions import LossPositions, find_output_layer
from tests.conftest import read_json, torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def test_gather_and_scatter_follow_megatrons_sequence_major_layout():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.float32)  # [batch, seq]
    values = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    positions = LossPositions(mask)
    assert positions.count == 4 and not positions.placeholder
    # Hidden states are [seq, batch]: (s0,b1), (s1,b0), (s2,b0), (s3,b1).
    assert positions.gather(values).tolist() == [[4.0, 1.0, 2.0, 7.0]]
    hidden = values.t()[..., None].expand(4, 2, 3)  # what the output layer's pre-hook indexes
    assert hidden[positions.where][:, 0].tolist() == [4.0, 1.0, 2.0, 7.0]

    compact = torch.tensor([[10.0, 11.0, 12.0, 13.0]], requires_grad=True)
    back = positions.scatter(compact)
    assert back.tolist() == [[0.0, 11.0, 12.0, 0.0], [10.0, 0.0, 0.0, 13.0]]
    (back * torch.arange(1.0, 9.0).reshape(2, 4)).sum().backward()
    assert compact.grad.tolist() == [[5.0, 2.0, 3.0, 8.0]]


def test_a_micro_batch_without_loss_tokens_keeps_one_position_that_reads_zero():
    positions = LossPositions(torch.zeros(2, 3))
    assert positions.placeholder and positions.count == 1
    compact = torch.tensor([[7.0]], requires_grad=True)
    back = positions.scatter(compact)
    assert back.abs().sum() == 0
    back.sum().backward()  # the output layer stays in the graph (a pipeline schedule backpropagates it)
    assert compact.grad is not None and compact.grad.item() == 0.0


def test_the_output_layer_is_found_through_wrappers_and_only_on_the_last_stage():
    last = torch.nn.Module()
    last.post_process, last.output_layer = True, torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module.module = last  # DDP(Float16Module(GPTModel))
    assert find_output_layer(wrapped) is last.output_layer
    first = torch.nn.Module()
    first.post_process, first.output_layer = False, None
    assert find_output_layer(first) is None


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_grpo_and_log_probabilities_equal_the_full_output_layer(tp, pp, tmp_path):
    out = tmp_path / "report.json"
    torchrun(SCRIPTS / "loss_positions_check.py", tp * pp,
             ["--tp", str(tp), "--pp", str(pp), "--run-dir", str(tmp_path / "run"), "--out", str(out)])
    r = read_json(out)
    assert r["last_stage"] and r["metric_names"] == ["clip_fraction", "entropy", "kl", "loss", "pg_loss", "ratio"]
    assert 0.0 < r["loss_tokens"] < 0.5 * 3 * 2 * 32
    # Training and forward_logprobs each: the loss tokens (+1 placeholder for the all-padding micro-batch)
    # against every position of the 3 micro-batches of 2 x 32.
    assert r["output_layer_rows"] == [2 * (r["loss_tokens"] + 1), 2 * 3 * 2 * 32]
    assert r["loss_diff"] <= 1e-6 and r["metric_diff"] <= 1e-5
    assert r["grad_norm"] > 0.1 and r["grad_diff"] <= 1e-6
    assert r["logprob_mean"] < -1.0 and r["logprob_diff"] <= 1e-6
    assert r["logprob_outside_mask"] == 0.0
    if pp == 1:
        assert all(a == b > 0 for a, b in r["training_logprobs_lengths"])
        assert r["training_logprobs_diff"] <= 1e-5


def test_sequence_parallel_output_layer_gathers_the_sequence_and_splits_its_gradient(tmp_path):
    out = tmp_path / "sp.json"
    torchrun(SCRIPTS / "loss_positions_sp.py", 2, [str(out)], timeout=180)
    r = read_json(out)
    assert r["loss_positions"] > 0 and r["sequence_parallel_restored"]
    assert r["nll_diff"] <= 1e-5
    # A reduce-scatter in the gather's backward (after the layer's own all-reduce) would double these.
    assert r["hidden_grad_max"] > 0.5 and r["hidden_grad_diff"] <= 1e-5
    assert r["weight_grad_max"] > 0.5 and r["weight_grad_diff"] <= 1e-5
