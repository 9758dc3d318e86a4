"""config.json files as released on the Hub (shrunk to test sizes, every field kept) convert; the extra fields
they carry are accepted only with the value that keeps the model what transformers runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_grm.models.hf_adapter import ConfigError
from megatron_grm.models.hf_convert import open_hf

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json (a nanotron export), sizes shrunk: 576 -> 64 hidden,
# 9/3 -> 4/2 heads, 30 -> 2 layers, 49152 -> 300 tokens.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.041666666666666664,
    "intermediate_size": 128, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 300,
}
# google/gemma-2-9b's config.json, sizes shrunk (3584 -> 64 hidden, 16/8 -> 4/2 heads of 16, 42 -> 4 layers,
# 256000 -> 300 tokens, window 4096 -> 6).
GEMMA2_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 4, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "pad_token_id": 0, "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 6, "sliding_window_size": 6, "torch_dtype": "float32",
    "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 300,
}


def hub_folder(folder: Path, config: dict) -> Path:
    """Weights of a transformers model built from ``config``, next to ``config`` written verbatim."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **values)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_smollm2_config_converts_with_its_rope_base(tmp_path):
    src = open_hf(hub_folder(tmp_path / "smollm2", SMOLLM2_CONFIG))
    assert (src.cfg.family, src.cfg.rotary_base, src.cfg.num_query_groups) == ("llama", 100000.0, 2)
    assert src.cfg.tie_word_embeddings


def test_interleaved_rope_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: rope_interleaved=True is not supported"):
        open_hf(hub_folder(tmp_path / "smollm2", {**SMOLLM2_CONFIG, "rope_interleaved": True}))


def test_gemma2_config_with_sliding_window_size_converts(tmp_path):
    src = open_hf(hub_folder(tmp_path / "gemma2", GEMMA2_CONFIG))
    assert (src.cfg.family, src.cfg.sliding_window, src.cfg.attn_logit_softcapping) == ("gemma2", 6, 50.0)


def test_gemma2_sliding_window_size_differing_from_sliding_window_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: sliding_window_size=8 differs from sliding_window=6"):
        open_hf(hub_folder(tmp_path / "gemma2", {**GEMMA2_CONFIG, "sliding_window_size": 8}))
