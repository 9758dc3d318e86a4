"""Precision settings that must fail loudly rather than train in another precision, FP8's recipe knobs,
the GPU a task binds to, and FP8 switched off around rollouts."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import python_json


def test_fp8_on_the_local_spec_is_refused_not_silently_bf16():
    # Without Transformer Engine (this machine) or with use_te=False Megatron's local linears never
    # quantize: an FP8 config would train in bf16 without a word.
    report = python_json("""
import json
from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.models.provider import build_model
from megatron_grm.parallel import ParallelLayout, init_parallel
init_parallel(ParallelLayout())
cfg = ModelConfig.from_dict(dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=128))
try:
    build_model(cfg, ParallelLayout(), PrecisionConfig("bf16", fp8="hybrid"), use_te=False)
    print(json.dumps({"error": None}))
except ValueError as err:
    print(json.dumps({"error": str(err)}))
""")
    assert report["error"] is not None
    assert "precision.fp8='hybrid'" in report["error"] and "local spec" in report["error"]


def test_fp8_recipe_knobs_are_validated():
    from megatron_grm.models.precision import PrecisionConfig

    knobs = PrecisionConfig("bf16", fp8="hybrid", fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    assert (knobs.fp8_margin, knobs.fp8_amax_history_len, knobs.fp8_amax_compute_algo) == (0, 1024, "max")
    with pytest.raises(ValueError, match="fp8_amax_compute_algo='mean'"):
        PrecisionConfig("bf16", fp8="hybrid", fp8_amax_compute_algo="mean")
    with pytest.raises(ValueError, match="fp8_amax_history_len must be >= 1"):
        PrecisionConfig("bf16", fp8="hybrid", fp8_amax_history_len=0)


def test_fp8_recipe_knobs_reach_megatrons_config():
    from megatron_grm.models.config import ModelConfig
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import transformer_config
    from megatron_grm.parallel import ParallelLayout

    cfg = ModelConfig.from_dict(dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                     num_query_groups=2, vocab_size=128))
    config = transformer_config(cfg, ParallelLayout(), PrecisionConfig(
        "bf16", fp8="hybrid", fp8_margin=1, fp8_amax_history_len=16, fp8_amax_compute_algo="max"))
    assert (config.fp8, config.fp8_margin, config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (
        "hybrid", 1, 16, "max")


def test_fp8_suspended_clears_every_config_and_restores_it():
    from megatron_grm.models.precision import fp8_suspended

    class Config:
        def __init__(self, fp8):
            self.fp8 = fp8

    shared = Config("hybrid")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model.config, model[0].config, model[1].config = shared, shared, Config("e4m3")
    with pytest.raises(RuntimeError), fp8_suspended(model):
        assert shared.fp8 is None and model[1].config.fp8 is None
        raise RuntimeError("a failing rollout still gives FP8 back")
    assert shared.fp8 == "hybrid" and model[1].config.fp8 == "e4m3"


@pytest.mark.parametrize(("local_rank", "visible", "index"), [(3, 8, 3), (0, 8, 0), (3, 1, 0), (5, 4, 1)])
def test_a_task_binds_to_its_gpu_whether_it_sees_the_node_or_only_its_own(local_rank, visible, index):
    from megatron_grm.parallel.distributed import local_device_index

    assert local_device_index(local_rank, visible) == index


def test_no_visible_gpu_is_an_error():
    from megatron_grm.parallel.distributed import local_device_index

    with pytest.raises(RuntimeError, match="no device is visible"):
        local_device_index(0, 0)


@pytest.mark.parametrize(("visible", "expected"), [(None, "0"), ("", "0"), ("3", "3"), ("3,5", "3"), (" 2 , 7", "2")])
def test_gpu_tests_run_on_the_first_gpu_this_job_may_use(monkeypatch, visible, expected):
    from tests.conftest import one_gpu_env

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert one_gpu_env() == {"CUDA_VISIBLE_DEVICES": expected}
