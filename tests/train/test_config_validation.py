"""Every configuration that cannot run is rejected with one clear message before any model is built."""

from __future__ import annotations

import pytest

from megatron_grm.stages.common import load_config
from megatron_grm.train.config import RunConfig, validate


def _check(overrides: list[str], world_size: int | None = None) -> None:
    validate(RunConfig.from_dict(load_config("sft", overrides)), world_size=world_size)


def test_shipped_configs_validate():
    _check([], world_size=1)
    _check(["parallel=tp2"], world_size=2)
    _check(["parallel=pp2"], world_size=2)
    _check(["model=gemma2_27b", "parallel=tp8_pp2_sp", "cluster=a100_16node", "precision=bf16",
            "trainer.global_batch_size=1024", "trainer.seq_length=4096"])
    _check(["model=llama3_8b", "precision=fp8", "cluster=h200_1gpu", "trainer.global_batch_size=4"])


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel=tp2"], 3, "does not divide the world size 3"),
        (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 2, "does not divide the world size 2"),
        (["model.num_attention_heads=3", "model.num_query_groups=3", "model.hidden_size=48", "parallel=tp2"], 2,
         "num_attention_heads=3 is not divisible by parallel.tensor_parallel=2"),
        (["model.num_query_groups=1", "parallel=tp2"], 2, "num_query_groups=1 (KV heads) is not divisible"),
        (["model.num_layers=3", "parallel=pp2"], 2, "num_layers=3 is not divisible by parallel.pipeline_parallel=2"),
        (["precision=fp8", "cluster=a100_16node", "model=llama3_8b", "parallel.tensor_parallel=8",
          "trainer.global_batch_size=128"], None, "needs compute capability >= 8.9 (Hopper/Ada); A100-80GB has 8.0"),
        (["precision=fp8"], 1, "needs a GPU with compute capability >= 8.9"),
        (["precision=fp8", "cluster=h200_1gpu", "model=llama3_8b", "model.ffn_hidden_size=14344",
          "trainer.global_batch_size=4"], 1, "'model.ffn_hidden_size / tensor_parallel': 14344"),
        (["precision=fp8", "cluster=h200_1gpu", "model=llama3_8b", "trainer.seq_length=1020",
          "trainer.global_batch_size=4"], 1, "trainer.seq_length=1020 must be a multiple of 8"),
        (["parallel=tp2", "parallel.sequence_parallel=true"], 2, "has no GPU: sequence/context parallelism"),
        (["precision=fp8", "cluster=h200_1gpu", "model=llama3_8b", "parallel.tensor_parallel=2",
          "parallel.sequence_parallel=true", "trainer.seq_length=1032", "trainer.micro_batch_size=1",
          "trainer.global_batch_size=4"], 2, "each TP rank's slice of trainer.seq_length=1032 / 2"),
        (["model=gemma2_27b", "parallel=tp8_pp2_sp", "cluster=a100_16node", "precision=bf16",
          "trainer.global_batch_size=1024", "trainer.seq_length=4100"], None,
         "trainer.seq_length=4100 must be divisible by parallel.tensor_parallel=8 with parallel.sequence_parallel"),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], 1, "global_batch_size=6 is not divisible"),
        (["trainer.seq_length=4096"], 1, "exceeds model.max_position_embeddings=1024"),
        (["trainer.recompute=partial"], 1, "trainer.recompute='partial'"),
        (["trainer.max_steps=2", "optimizer.warmup_steps=2"], 1,
         "optimizer.warmup_steps=2 must be smaller than trainer.max_steps=2"),
    ],
)
def test_invalid_config_is_rejected_with_its_message(overrides, world, message):
    with pytest.raises(ValueError) as err:
        _check(overrides, world)
    assert message in str(err.value)


def test_unknown_fields_and_unsupported_model_settings_are_errors():
    with pytest.raises(ValueError, match="unknown trainer field"):
        _check(["+trainer.max_stpes=3"], 1)
    with pytest.raises(ValueError, match="unknown model config field"):
        _check(["+model.rope_typo=1"], 1)
    with pytest.raises(ValueError, match="RoPE scaling is not implemented"):
        _check(["+model.rope_scaling={rope_type: llama3, factor: 8.0}"], 1)
    with pytest.raises(ValueError, match="is a Gemma-2 field"):
        _check(["+model.attn_logit_softcapping=50.0"], 1)
    with pytest.raises(ValueError, match="model.family='mistral'"):
        _check(["model.family=mistral"], 1)
    with pytest.raises(ValueError, match="precision.fp8 needs precision.params_dtype=bf16"):
        _check(["precision.fp8=hybrid"], 1)


def test_the_trainer_refuses_context_parallelism_it_does_not_implement():
    """CP passes validation on a GPU cluster (the planner plans it), but the Trainer feeds whole sequences
    and reduces the loss over DP only: it must refuse before building anything, not train wrongly."""
    from megatron_grm.train.loop import Trainer

    run = RunConfig.from_dict(load_config("sft", [
        "model=llama3_8b", "cluster=h200_1gpu", "precision=bf16", "parallel.context_parallel=2",
        "trainer.global_batch_size=4", "trainer.seq_length=4096"]))
    validate(run, world_size=2)  # a valid layout for the planner
    with pytest.raises(NotImplementedError, match="context_parallel=2: the Trainer does not split"):
        Trainer(run)


STAGE_CONFIGS = {"sft": "sft", "rft": "rft", "grpo": "grpo", "metarm": "metarm", "eval": "evaluate"}


def _documented_cluster_commands() -> list[tuple[str, str, list[str]]]:
    """Every `sbatch slurm/<stage>.sh OVERRIDES...` line of docs/slurm.md and of the scripts' headers."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    found = []
    for path in [repo / "docs" / "slurm.md", *sorted((repo / "slurm").glob("*.sh"))]:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:#\s+)?sbatch slurm/(\w+)\.sh((?:\s+\S+)*)\s*$", line)
            if m and m.group(1) in STAGE_CONFIGS:
                found.append((str(path.relative_to(repo)), m.group(1), m.group(2).split()))
    return found


def test_the_documented_cluster_commands_validate_on_128_gpus():
    """What `sbatch slurm/<stage>.sh ...` runs as written in the docs: the script adds cluster=a100_16node unless
    the overrides choose a cluster or an experiment preset (slurm/common.sh), and starts 16 x 8 = 128 ranks."""
    commands = _documented_cluster_commands()
    assert {stage for _, stage, _ in commands} == set(STAGE_CONFIGS), commands
    for where, stage, overrides in commands:
        if not any(o.lstrip("+").startswith(("cluster=", "experiment=")) for o in overrides):
            overrides = ["cluster=a100_16node", *overrides]
        run = RunConfig.from_dict(load_config(STAGE_CONFIGS[stage], overrides))
        try:
            validate(run, world_size=128)
        except ValueError as err:
            raise AssertionError(f"{where}: sbatch slurm/{stage}.sh {' '.join(overrides)}: {err}") from err
        assert run.cluster.world_size == 128 and run.cluster.gpu == "A100-80GB", (where, overrides)


def test_the_27b_sft_preset_trains_like_rft():
    sft = RunConfig.from_dict(load_config("sft", ["+experiment=sft_gemma2_27b"]))
    rft = RunConfig.from_dict(load_config("rft"))
    validate(sft, world_size=128)
    assert sft.model == rft.model and sft.parallel == rft.parallel and sft.cluster == rft.cluster
    for name in ("micro_batch_size", "global_batch_size", "seq_length", "recompute", "peak_tflops"):
        assert getattr(sft.trainer, name) == getattr(rft.trainer, name), name
    assert sft.optimizer == rft.optimizer
    assert sft.precision == rft.precision


@pytest.mark.parametrize(("overrides", "multiple"), [
    ([], 8),
    (["model=gemma2_27b", "parallel=tp8_pp2_sp", "cluster=a100_16node", "precision=bf16"], 8),
    (["model=llama3_8b", "parallel=tp8_pp2_sp", "cluster=h200_1gpu", "precision=fp8"], 64),
])
def test_rft_pads_rows_so_that_each_sequence_parallel_slice_fits_fp8(overrides, multiple):
    # TE's FP8 GEMM takes a multiple of 8 rows, and under sequence parallelism it runs on each TP rank's slice.
    from megatron_grm.train.producers import pad_multiple_for

    run = RunConfig.from_dict(load_config("sft", overrides))
    assert pad_multiple_for(run, 8) == multiple
