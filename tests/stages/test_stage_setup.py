"""stages/common.py: what every stage checks before it builds anything — the tokenizer it reads with,
and that a GPU cluster config finds CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_grm.stages.common import check_cuda_matches_cluster, load_config, tokenizer_name
from megatron_grm.train.config import RunConfig


def _run(overrides: list[str]) -> RunConfig:
    return RunConfig.from_dict(load_config("sft", overrides))


def _checkpoint_root(root, tokenizer: str | None):
    """A checkpoint root as tools/convert leaves it: ``latest`` naming an iteration with model_config.json."""
    folder = root / "iter_0000000"
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(json.dumps({"model": {}, "tokenizer": tokenizer}))
    (root / "latest").write_text("iter_0000000")
    return root


def test_a_real_model_without_a_tokenizer_is_refused_instead_of_reading_characters():
    with pytest.raises(ValueError, match="vocab_size=128256 would read the character tokenizer"):
        tokenizer_name(_run(["model=llama3_8b"]))


def test_the_tokenizer_recorded_in_the_loaded_checkpoint_is_used(tmp_path):
    root = _checkpoint_root(tmp_path / "ckpt", "/models/llama3/tokenizer")
    assert tokenizer_name(_run(["model=llama3_8b", f"trainer.load={root}"])) == "/models/llama3/tokenizer"
    assert tokenizer_name(_run(["model=llama3_8b", f"trainer.load={root}/iter_0000000"])) == \
        "/models/llama3/tokenizer"
    assert tokenizer_name(_run(["model=llama3_8b", f"trainer.load={root}", "model.tokenizer=/mine"])) == "/mine"
    moved = _checkpoint_root(tmp_path / "moved", "relative/out/tokenizer")  # converted elsewhere with --out relative
    (moved / "tokenizer").mkdir()
    (moved / "tokenizer" / "tokenizer_config.json").write_text("{}")  # what tools/convert copies there
    assert tokenizer_name(_run(["model=llama3_8b", f"trainer.load={moved}"])) == str(moved / "tokenizer")
    relocated = _checkpoint_root(tmp_path / "relocated", "/gone/iter_0000000/tokenizer")  # today's layout, moved
    (relocated / "iter_0000000" / "tokenizer").mkdir()
    (relocated / "iter_0000000" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    assert tokenizer_name(_run(["model=llama3_8b", f"trainer.load={relocated}"])) == \
        str(relocated / "iter_0000000" / "tokenizer")
    silent = _checkpoint_root(tmp_path / "silent", None)
    (silent / "tokenizer").mkdir()  # another conversion's, beside a checkpoint converted with --no-tokenizer
    (silent / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="records none"):
        tokenizer_name(_run(["model=llama3_8b", f"trainer.load={silent}"]))


def test_the_cpu_models_read_the_character_tokenizer():
    assert tokenizer_name(_run(["model=tiny"])) == "char"
    assert tokenizer_name(_run(["model=tiny", "model.tokenizer=null"])) == "char"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a process without CUDA must give")
def test_a_gpu_cluster_config_without_cuda_is_refused():
    check_cuda_matches_cluster(_run(["cluster=local_cpu"]))
    with pytest.raises(RuntimeError, match="cluster=h200_1gpu names H200 GPUs but this process sees no CUDA"):
        check_cuda_matches_cluster(_run(["cluster=h200_1gpu", "model=llama3_8b", "precision=bf16",
                                         "trainer.global_batch_size=4"]))


@pytest.mark.parametrize(("stage", "message"), [
    ("grpo", "trainer.load is not set: GRPO starts from the RFT checkpoint"),
    ("metarm", "trainer.load is not set: the MetaRM's backbone is the trained GRM"),
])
def test_a_stage_that_improves_a_trained_grm_refuses_to_start_from_random_weights(tmp_path, stage, message):
    from tests.conftest import REPO, torchrun

    proc = torchrun(REPO / "megatron_grm" / "stages" / f"{stage}.py", 1,
                    [f"+experiment={stage}_tiny", "trainer.load=null", "data.train=arithmetic:train:8",
                     f"trainer.run_dir={tmp_path / 'run'}"], timeout=120, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_collective_timeout_comes_from_the_cluster_config(tmp_path):
    from tests.conftest import python_json

    got = python_json(f"""
import json, torch
from megatron.core import parallel_state
from megatron_grm.stages.common import load_config, prepare_run
prepare_run(load_config("sft", ["model=tiny", "cluster.distributed_timeout_minutes=7",
                                "trainer.run_dir={tmp_path / 'run'}"]))
cpu = torch.device("cpu")
world = torch.distributed.group.WORLD._get_backend(cpu).options._timeout
dp = parallel_state.get_data_parallel_group()._get_backend(cpu).options._timeout
print(json.dumps([world.total_seconds(), dp.total_seconds()]))
""")
    assert got == [7 * 60, 7 * 60]
    with pytest.raises(ValueError, match="cluster.distributed_timeout_minutes=0"):
        from megatron_grm.train.config import validate

        validate(_run(["cluster.distributed_timeout_minutes=0"]))


def test_a_run_dir_that_hydra_resolves_elsewhere_than_the_launchers_folder_is_refused(tmp_path, monkeypatch):
    """slurm/*.sh reads a user's trainer.run_dir in bash: an interpolation or quotes made the launcher log and
    mark one folder while the ranks checkpointed into another (outside a container's mounts: lost)."""
    from megatron_grm.stages.common import check_run_dir_matches_launcher

    monkeypatch.setenv("GRM_RUN_DIR", str(tmp_path / "grpo-42"))
    check_run_dir_matches_launcher(str(tmp_path / "grpo-42"))
    with pytest.raises(ValueError, match=f"resolves to {tmp_path / 'other'}, but the Slurm launcher prepared "
                                         f"{tmp_path / 'grpo-42'}"):
        check_run_dir_matches_launcher(str(tmp_path / "other"))
    monkeypatch.delenv("GRM_RUN_DIR")
    check_run_dir_matches_launcher(str(tmp_path / "other"))  # not under the Slurm scripts: nothing to match


def test_evaluation_does_not_check_the_global_batch_it_never_reads():
    """conf/evaluate.yaml's global_batch_size (8) had to divide micro_batch_size x DP: eval refused DP > 8."""
    from megatron_grm.train.config import validate

    run = RunConfig.from_dict(load_config("evaluate", ["model=tiny", "parallel=single", "trainer.seq_length=512"]))
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible by micro_batch_size"):
        validate(run, world_size=16)
    validate(run, world_size=16, training=False)


def _trained_on(root, template: str, chat: bool):
    """A checkpoint root whose iteration records the GRM prompt template it was trained on."""
    folder = root / "iter_0000010"
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(json.dumps({"model": {}, "tokenizer": "char",
                                                          "prompt": {"template": template, "chat": chat}}))
    (root / "latest").write_text("iter_0000010")
    return root


def test_a_prompt_template_other_than_the_checkpoints_is_named_with_the_settings_to_set(tmp_path):
    from megatron_grm.stages.common import prompt_template_mismatch

    root = _trained_on(tmp_path / "rft", "compact", False)
    names = ("eval.variant", "eval.chat")
    assert prompt_template_mismatch(str(root), "compact", False, names) is None
    assert prompt_template_mismatch(str(root / "iter_0000010"), "compact", False, names) is None
    assert prompt_template_mismatch(None, "default", True, names) is None
    assert prompt_template_mismatch(str(_checkpoint_root(tmp_path / "hf", "char")), "default", True, names) is None
    for template, chat in (("default", False), ("compact", True)):
        message = prompt_template_mismatch(str(root), template, chat, names)
        assert message == (f"{root / 'iter_0000010'} was trained on GRM prompts in template 'compact' with "
                           f"chat=False; this run builds them in {template!r} with chat={chat}, which it never "
                           "saw: set eval.variant=compact eval.chat=false")


def test_the_stages_check_a_grms_prompt_template_against_the_one_they_build(tmp_path):
    """Real stages: a 2-step bootstrap with chat formatting records it; RFT and GRPO in the tiny presets
    (no chat formatting) start from it with a warning naming what to set, and the evaluation and the MetaRM's
    fresh sampling refuse it before sampling anything."""
    from tests.conftest import REPO, read_json, torchrun

    stages = REPO / "megatron_grm" / "stages"
    boot = tmp_path / "boot"
    torchrun(stages / "bootstrap.py", 1, [f"trainer.run_dir={boot}", "trainer.max_steps=2", "trainer.save_interval=2",
                                          "optimizer.warmup_steps=0", "trainer.global_batch_size=4",
                                          "trainer.micro_batch_size=4", "data.train=arithmetic:train:16",
                                          "data.instruction=digit_facts:8", "data.heldout=null", "bootstrap.chat=true"])
    folder = (boot / "checkpoints" / "iter_0000002").resolve()
    assert read_json(folder / "model_config.json")["prompt"] == {"template": "compact", "chat": True}
    told = (f"{folder} was trained on GRM prompts in template 'compact' with chat=True; this run builds them in "
            "'compact' with chat=False, which it never saw: set {}")
    rft = torchrun(stages / "rft.py", 1, ["+experiment=rft_tiny", f"trainer.run_dir={tmp_path / 'rft'}",
                                          f"trainer.load={boot / 'checkpoints'}", "rft.phase=sample",
                                          "data.train=arithmetic:train:4", "data.heldout=null",
                                          "rft.eval_before=false", "rft.sampling.max_new_tokens=8"])
    assert told.format("rft.variant=compact rft.chat=true (unless") in rft.stdout + rft.stderr
    grpo = torchrun(stages / "grpo.py", 1, ["+experiment=grpo_tiny", f"trainer.run_dir={tmp_path / 'grpo'}",
                                            f"trainer.load={boot / 'checkpoints'}", "trainer.max_steps=1",
                                            "optimizer.warmup_steps=0", "trainer.global_batch_size=8",
                                            "trainer.micro_batch_size=8", "data.train=arithmetic:train:8",
                                            "data.val=null", "grpo.max_new_tokens=8"])
    assert told.format("grpo.template=compact grpo.chat=true (unless") in grpo.stdout + grpo.stderr
    evaluation = torchrun(stages / "evaluate.py", 1, ["+experiment=eval_tiny", "model=tiny_grm",
                                                      f"trainer.load={folder}", f"trainer.run_dir={tmp_path / 'eval'}"],
                          check=False)
    assert evaluation.returncode != 0
    assert told.format("eval.variant=compact eval.chat=true\n") in evaluation.stdout + evaluation.stderr + "\n"
    assert not list((tmp_path / "eval").glob("samples*.jsonl"))
    metarm = torchrun(stages / "metarm.py", 1, ["+experiment=metarm_tiny", "model=tiny_grm", f"trainer.load={folder}",
                                                f"trainer.run_dir={tmp_path / 'metarm'}", "data.samples=null",
                                                "data.train=arithmetic:train:4"], check=False)
    assert metarm.returncode != 0  # its fresh judgments would not be what the GRM writes at inference
    assert told.format("metarm.fresh.variant=compact metarm.fresh.chat=true\n") in metarm.stdout + metarm.stderr + "\n"
