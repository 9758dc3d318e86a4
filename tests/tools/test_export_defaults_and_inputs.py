"""What the conversion tools do by default and with bad input: a bf16 model comes back bf16, the exported
config.json is readable by transformers 4 too, an export over an earlier one leaves only its own weights,
and a missing/broken input or an impossible TP/PP layout is exit 2 with the file and field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_grm.models.hf_convert import export_dtype
from megatron_grm.models.hf_io import SAFETENSORS_FILE, SAFETENSORS_INDEX, HFWeights
from tests.models.hf_models import make_tokenizer, random_model, save_random_hf
from tests.tools.cli import describe, run_tool

TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Two Llama models converted with the default flags: one saved in bf16, one (another seed) in fp32."""
    root = tmp_path_factory.mktemp("export_defaults")
    paths = {"hf_bf16": root / "hf_bf16", "hf_other": save_random_hf("llama", root / "hf_other", seed=1),
             "ckpt_bf16": root / "ckpt_bf16", "ckpt_other": root / "ckpt_other", "out_bf16": root / "out_bf16"}
    random_model("llama").to(torch.bfloat16).save_pretrained(paths["hf_bf16"])
    make_tokenizer().save_pretrained(paths["hf_bf16"])
    for name in ("bf16", "other"):
        proc = run_tool("convert_hf_to_mcore", "--hf", str(paths[f"hf_{name}"]), "--out", str(paths[f"ckpt_{name}"]))
        assert proc.returncode == 0, describe(proc)
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(paths["ckpt_bf16"]), "--out", str(paths["out_bf16"]))
    assert proc.returncode == 0, describe(proc)
    return paths


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(folder)
    return {name: weights.get(name) for name in weights.names()}


# ------------------------------------------------------------------------------------------ dtype
def test_bf16_model_converted_and_exported_with_defaults_comes_back_bf16_and_unchanged(converted):
    metadata = json.loads((converted["ckpt_bf16"] / "iter_0000000" / "model_config.json").read_text())
    assert metadata["source"]["dtype"] == "bfloat16"
    original, back = tensors(converted["hf_bf16"]), tensors(converted["out_bf16"])
    assert sorted(back) == sorted(original)
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    assert all(torch.equal(original[name], back[name]) for name in original)


def test_export_dtype_prefers_the_flag_then_the_recorded_source_then_the_stored_dtype():
    bf16_source = {"source": {"hf": "/models/x", "model_type": "llama", "dtype": "bfloat16"}}
    assert export_dtype(None, bf16_source, torch.float32) == torch.bfloat16
    assert export_dtype("fp32", bf16_source, torch.float32) == torch.float32
    assert export_dtype(None, {"source": {"hf": "/models/x"}}, torch.float32) == torch.float32  # older checkpoint
    assert export_dtype(None, {"stage": "rft"}, torch.bfloat16) == torch.bfloat16  # no source block at all
    # An fp16 source (stored exactly in fp32) comes back fp16, not at twice its size.
    assert export_dtype(None, {"source": {"dtype": "float16"}}, torch.float32) == torch.float16
    assert export_dtype("fp16", {}, torch.float32) == torch.float16
    assert export_dtype(None, {"source": {"dtype": "float8_e4m3fn"}}, torch.float32) == torch.float32  # not one


# ------------------------------------------------------------------------------------------ config.json
def test_exported_config_carries_rope_theta_and_torch_dtype_and_transformers_5_runs_it_unchanged(converted):
    config = json.loads((converted["out_bf16"] / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5000.0
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert torch.equal(logits(converted["out_bf16"]), logits(converted["hf_bf16"]))


# ------------------------------------------------------------------------------------------ re-export
def test_export_over_an_earlier_export_leaves_only_its_own_weights(converted, tmp_path):
    out = tmp_path / "out"
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(converted["ckpt_other"]), "--out", str(out))
    assert proc.returncode == 0, describe(proc)
    (out / "metarm_head.safetensors").write_bytes((out / SAFETENSORS_FILE).read_bytes())  # as a MetaRM export's

    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(converted["ckpt_bf16"]), "--out", str(out),
                    "--max-shard-size", "100KB")
    assert proc.returncode == 0, describe(proc)
    assert f"removed {out / SAFETENSORS_FILE} left by an earlier export" in proc.stderr
    assert not (out / SAFETENSORS_FILE).exists() and not (out / "metarm_head.safetensors").exists()
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert torch.equal(logits(out), logits(converted["hf_bf16"]))  # transformers runs the second export

    (out / "tokenizer.model").write_bytes(b"an earlier SentencePiece model's")  # a file this tokenizer lacks
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(converted["ckpt_other"]), "--out", str(out))
    assert proc.returncode == 0, describe(proc)
    assert not (out / SAFETENSORS_INDEX).exists() and not list(out.glob("model-*-of-*.safetensors"))
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
    original, back = tensors(converted["hf_other"]), tensors(out)
    assert sorted(back) == sorted(original) and all(torch.equal(original[n], back[n]) for n in original)


def test_an_export_refused_for_want_of_a_tokenizer_leaves_the_earlier_export_whole(converted, tmp_path):
    out = tmp_path / "out"
    assert run_tool("convert_mcore_to_hf", "--ckpt", str(converted["ckpt_other"]), "--out", str(out)).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    ckpt = Path(shutil.copytree(converted["ckpt_other"], tmp_path / "ckpt"))
    shutil.rmtree(ckpt / "iter_0000000" / "tokenizer")
    metadata = ckpt / "iter_0000000" / "model_config.json"
    recorded = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**recorded, "tokenizer": None, "model": {**recorded["model"], "tokenizer": None}}))
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(ckpt), "--out", str(out))
    assert proc.returncode == 2 and "has no Hugging Face tokenizer folder" in proc.stderr, describe(proc)
    assert sorted(p.name for p in out.iterdir()) == before  # its weights were deleted before the refusal
    assert torch.equal(logits(out), logits(converted["hf_other"]))


def test_verify_fails_when_the_logits_are_not_finite(converted, tmp_path):
    """max(0.0, nan) is 0.0 in Python: NaN logits used to print a difference of 0 and pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted["hf_other"])
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # as an overflowed or corrupted weight would
    model.save_pretrained(tmp_path / "hf_nan")
    proc = run_tool("verify_conversion", "--hf", str(tmp_path / "hf_nan"), "--ckpt", str(converted["ckpt_other"]))
    assert proc.returncode == 1, describe(proc)
    assert "max_abs_logit_diff=inf" in proc.stdout


# ------------------------------------------------------------------------------------------ bad input
def test_verify_names_a_missing_hf_folder_with_exit_2(converted, tmp_path):
    missing = tmp_path / "no_such_model"
    proc = run_tool("verify_conversion", "--hf", str(missing), "--ckpt", str(converted["ckpt_bf16"]))
    assert proc.returncode == 2, describe(proc)
    assert f"{missing / 'config.json'}: file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_names_a_broken_hf_config_with_exit_2(converted, tmp_path):
    folder = Path(shutil.copytree(converted["hf_other"], tmp_path / "hf"))
    (folder / "config.json").write_text('{"model_type": "llama", ')
    proc = run_tool("verify_conversion", "--hf", str(folder), "--ckpt", str(converted["ckpt_other"]))
    assert proc.returncode == 2, describe(proc)
    assert f"{folder / 'config.json'}: not valid JSON" in proc.stderr


def test_verify_names_a_checkpoint_with_a_missing_data_file_with_exit_2(converted, tmp_path):
    ckpt = Path(shutil.copytree(converted["ckpt_other"], tmp_path / "ckpt"))
    victim = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    victim.unlink()
    proc = run_tool("verify_conversion", "--hf", str(converted["hf_other"]), "--ckpt", str(ckpt))
    assert proc.returncode == 2, describe(proc)
    assert f"{victim}: checkpoint data file is missing" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "named"), [
    (["--tp", "4"], "num_key_value_heads=2 is not divisible by --tp 4"),
    (["--pp", "3"], "num_hidden_layers=4 is not divisible by --pp 3"),
])
def test_convert_refuses_a_layout_the_model_does_not_divide_into_before_starting_processes(
        converted, tmp_path, flags, named):
    proc = run_tool("convert_hf_to_mcore", "--hf", str(converted["hf_other"]), "--out", str(tmp_path / "ckpt"),
                    *flags)
    assert proc.returncode == 2, describe(proc)
    assert f"{converted['hf_other'] / 'config.json'}: {named}" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_an_export_that_fails_after_its_checks_leaves_the_earlier_export_whole(converted, tmp_path):
    """A tokenizer that does not load used to fail after the earlier export's weights were deleted; now every
    fallible step comes before --out is touched and the files move in from a staging folder last."""
    out = tmp_path / "out"
    assert run_tool("convert_mcore_to_hf", "--ckpt", str(converted["ckpt_other"]), "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ckpt = Path(shutil.copytree(converted["ckpt_bf16"], tmp_path / "ckpt"))
    tokenizer = ckpt / "iter_0000000" / "tokenizer"
    metadata = ckpt / "iter_0000000" / "model_config.json"  # it records the original's absolute path
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "tokenizer": str(tokenizer)}))
    (tokenizer / "generation_config.json").unlink(missing_ok=True)  # the ids then come from the tokenizer itself
    (tokenizer / "tokenizer.json").write_text("{ not json")
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(ckpt), "--out", str(out))
    assert proc.returncode == 2, describe(proc)
    assert f"error: {tokenizer}: the tokenizer does not load" in proc.stderr, describe(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing removed, nothing staged left


def test_a_broken_model_config_is_named_with_its_path(converted, tmp_path):
    ckpt = Path(shutil.copytree(converted["ckpt_other"], tmp_path / "ckpt"))
    metadata = ckpt / "iter_0000000" / "model_config.json"
    recorded = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**recorded, "model": {**recorded["model"], "rope_base": 1.0}}))
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"error: {metadata}: field 'model': unknown model config field" in proc.stderr, \
        describe(proc)
    metadata.write_text('{"model": ')
    from megatron_grm.train.checkpoint import read_metadata

    with pytest.raises(ValueError, match=f"{metadata}: not valid JSON"):  # the tool prints ValueErrors as above
        read_metadata(str(metadata.parent))


def test_a_conversion_into_a_training_root_is_refused_and_a_second_conversion_replaces_the_first(converted,
                                                                                                 tmp_path):
    """A root with later checkpoints would resume from the fresh step 0 (latest moves back); converting
    another model into a root that held one used to keep the first model's tokenizer files beside it."""
    root = Path(shutil.copytree(converted["ckpt_other"], tmp_path / "ckpt"))
    proc = run_tool("convert_hf_to_mcore", "--hf", str(converted["hf_bf16"]), "--out", str(root))
    assert proc.returncode == 0, describe(proc)  # the same root again: iter_0000000 is replaced whole
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000000", "latest"]
    meta = json.loads((root / "iter_0000000" / "model_config.json").read_text())
    assert meta["source"]["hf"] == str(converted["hf_bf16"].resolve())
    assert Path(meta["tokenizer"]) == (root / "iter_0000000" / "tokenizer").resolve()
    (root / "iter_0000500").mkdir()
    proc = run_tool("convert_hf_to_mcore", "--hf", str(converted["hf_other"]), "--out", str(root))
    assert proc.returncode == 2 and "holds other checkpoints (iter_0000500)" in proc.stderr, describe(proc)
    assert json.loads((root / "iter_0000000" / "model_config.json").read_text()) == meta  # --force: see below


def test_an_interrupted_conversions_leftovers_are_not_other_checkpoints(tmp_path):
    from megatron_grm.models.hf_convert import check_conversion_target
    from megatron_grm.models.hf_io import HFFolderError

    for name in ("iter_0000000", "iter_0000000.tmp", "iter_0000000.replaced"):
        (tmp_path / name).mkdir()
    check_conversion_target(tmp_path)  # a rerun after a crash: allowed
    (tmp_path / "iter_0000300").mkdir()
    with pytest.raises(HFFolderError, match=r"holds other checkpoints \(iter_0000300\)"):
        check_conversion_target(tmp_path)
    check_conversion_target(tmp_path, force=True)
