"""GPU path: Megatron-Core's dynamic inference engine behind RolloutEngine (skipped without CUDA); its
attention is flash-attn's where installed, else parallel/paged_attention.py's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "dynamic_checks.py"
BF16_LOGPROB_TOL = 0.1  # bf16 logits; the engine's attention and the training attention round differently


@pytest.mark.gpu
def test_dynamic_engine_samples_with_logprobs_that_match_training(tmp_path):
    torchrun(SCRIPT, 1, ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out.json")])
    out = read_json(tmp_path / "out.json")
    assert out["backend"] == "dynamic"
    assert out["attention"] == ("flash-attn" if importlib.util.find_spec("flash_attn") else "torch")
    assert out["n_samples"] == 16
    assert out["lengths_match_logprobs"] is True
    assert out["debug_logprob_diff"] <= BF16_LOGPROB_TOL
    assert out["sampled_logprob_diff"] <= BF16_LOGPROB_TOL
    assert out["same_seed_equal"] is True
    # Per-request streams: a wrong token counter or key would make these agree only by chance. bf16 logits
    # differ between batch shapes and backends, which can move a draw across a CDF boundary now and then.
    streams = out["streams"]
    assert min(streams.values()) >= 0.75, streams
    assert streams["reversed_first_token"] >= 0.9 and streams["static_first_token"] >= 0.9, streams
    # Same argmax as the static engine at least for the first tokens (bf16 near-ties may flip later ones).
    for dyn, sta in zip(out["dynamic_greedy"], out["static_greedy"]):
        assert dyn[:4] == sta[:4]
    ended = out["second_end_id"]
    assert ended["got"] == ended["expected"] and ended["finish"] == "stop"
    assert ended["n_logprobs"] == len(ended["got"])
    evictions = out["evictions"]
    assert evictions["evicted"] > 0, evictions  # the KV budget really ran out
    assert evictions["restored"] == evictions["evicted"], evictions  # every re-queued request kept its stop words
    assert evictions["lengths"] == [512] * 8 and evictions["finish"] == ["length"] * 8, evictions
