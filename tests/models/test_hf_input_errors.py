"""A broken or unsupported Hugging Face folder is refused before conversion, naming the file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_grm.models.hf_adapter import ConfigError
from megatron_grm.models.hf_convert import open_hf
from megatron_grm.models.hf_io import HFFolderError
from tests.models.hf_models import random_model, save_random_hf

K_PROJ = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_random_hf("llama", tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture
def copy_of(llama_dir, tmp_path):
    def make(source: Path = llama_dir) -> Path:
        return Path(shutil.copytree(source, tmp_path / "hf"))
    return make


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_valid_folder_opens_with_matching_config(llama_dir):
    src = open_hf(llama_dir)
    assert (src.cfg.family, src.cfg.num_layers, src.cfg.num_query_groups, src.cfg.vocab_size) == ("llama", 4, 2, 300)
    assert src.cfg.rotary_base == 5000.0 and not src.cfg.tie_word_embeddings


def test_missing_shard_names_the_file_and_a_tensor_it_holds(tmp_path):
    folder = tmp_path / "sharded"
    random_model("llama").save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(index.values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(HFFolderError) as err:
        open_hf(folder)
    held = [name for name, file in index.items() if file == victim]
    assert victim in str(err.value) and any(name in str(err.value) for name in held)


def test_wrong_tensor_shape_names_the_file_tensor_and_both_shapes(copy_of):
    folder = copy_of()
    edit_tensors(folder, lambda t: t.update({K_PROJ: torch.zeros(48, 64)}))
    with pytest.raises(HFFolderError) as err:
        open_hf(folder)
    message = str(err.value)
    assert "model.safetensors" in message and K_PROJ in message
    assert "[48, 64]" in message and "[32, 64]" in message  # found vs. 2 KV heads x head_dim 16


def test_missing_tensor_is_named(copy_of):
    folder = copy_of()
    edit_tensors(folder, lambda t: t.pop(K_PROJ))
    with pytest.raises(HFFolderError, match=K_PROJ.replace(".", r"\.") + " is missing"):
        open_hf(folder)


def test_unexpected_tensor_is_named_not_dropped(copy_of):
    folder = copy_of()
    edit_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_scale": torch.ones(4)}))
    with pytest.raises(HFFolderError) as err:
        open_hf(folder)
    assert "model.safetensors" in str(err.value) and "model.layers.0.self_attn.rotary_scale" in str(err.value)


def test_truncated_safetensors_file_is_named(copy_of):
    folder = copy_of()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HFFolderError, match="model.safetensors"):
        open_hf(folder).megatron_tensor("decoder.layers.3.mlp.linear_fc2.weight")


def test_unknown_model_type_names_config_and_type(copy_of):
    folder = copy_of()
    edit_config(folder, model_type="mamba")
    with pytest.raises(ConfigError) as err:
        open_hf(folder)
    assert "config.json" in str(err.value) and "'mamba'" in str(err.value) and "gemma2" in str(err.value)


@pytest.mark.parametrize(("changes", "named"), [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 128}}, "rope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"attn_temperature_tuning": True}, "attn_temperature_tuning"),
])
def test_unsupported_llama_config_field_is_refused_by_name(copy_of, changes, named):
    folder = copy_of()
    edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=named):
        open_hf(folder)


def test_qwen2_sliding_window_attention_is_refused(tmp_path):
    folder = save_random_hf("qwen2", tmp_path / "qwen2")
    edit_config(folder, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        open_hf(folder)


def test_gemma2_window_on_odd_layers_is_refused(tmp_path):
    folder = save_random_hf("gemma2", tmp_path / "gemma2")
    edit_config(folder, layer_types=["full_attention", "sliding_attention"] * 2)
    with pytest.raises(ConfigError, match="layer_types"):
        open_hf(folder)


def test_gemma2_with_sliding_layers_and_a_null_window_is_refused_naming_the_window(tmp_path):
    folder = save_random_hf("gemma2", tmp_path / "gemma2")
    edit_config(folder, sliding_window=None)
    with pytest.raises(ConfigError, match="sliding_window is null, but layer_types has sliding-window layers"):
        open_hf(folder)


def test_gemma2_without_a_window_exports_a_config_transformers_runs_with_the_same_logits(tmp_path):
    """Every layer full attention: the window was dropped on import and exported as null, which
    transformers' Gemma2Model refuses on its first forward (it builds the sliding mask regardless)."""
    import transformers as tf

    from megatron_grm.models.hf_convert import adapter_for_family

    source = random_model("gemma2")
    source.config.layer_types = ["full_attention"] * source.config.num_hidden_layers
    folder = tmp_path / "gemma2"
    source.save_pretrained(folder)
    cfg = open_hf(folder).cfg
    assert cfg.sliding_window is None
    values = adapter_for_family("gemma2").hf_config(cfg, torch.float32, {})
    assert values["sliding_window"] == cfg.max_position_embeddings
    exported = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{k: v for k, v in values.items() if k != "model_type"}))
    exported.config._attn_implementation = "eager"
    exported.load_state_dict(source.state_dict())
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.eval()(tokens).logits, source(tokens).logits)


def test_tied_model_with_a_different_lm_head_is_refused(tmp_path):
    folder = save_random_hf("qwen2", tmp_path / "qwen2")
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": torch.randn(300, 64)}))
    with pytest.raises(HFFolderError, match="lm_head.weight differs"):
        open_hf(folder)


def test_folder_with_both_a_single_file_and_an_index_is_refused(llama_dir, tmp_path):
    """transformers would load model.safetensors and ignore the shards; converting the shards could differ."""
    folder = tmp_path / "both"
    random_model("llama", seed=1).save_pretrained(folder, max_shard_size="100KB")
    shutil.copy2(llama_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(HFFolderError) as err:
        open_hf(folder)
    message = str(err.value)
    assert message.startswith(f"{folder}: holds both model.safetensors and model.safetensors.index.json")
