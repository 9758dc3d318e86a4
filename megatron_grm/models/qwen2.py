"""Qwen2 <-> Megatron-Core: a Llama layer with biases on Q, K and V (``add_qkv_bias``).

Qwen2's optional sliding-window attention (``use_sliding_window``) is off in every released Qwen2 /
Qwen2.5 model and is not implemented here: a config that turns it on is rejected, not silently run
with full attention.
"""

from __future__ import annotations

from typing import Any

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.hf_adapter import ConfigError, WeightRule, qkv_rule
from megatron_grm.models.llama import LLAMA_MAPPED_KEYS, LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    mapped_keys = LLAMA_MAPPED_KEYS | {"layer_types"}
    required_values = {
        "hidden_act": ("silu",),
        "attention_dropout": (0.0, 0, None),
        "use_sliding_window": (False, None),
    }
    # Only read by transformers when use_sliding_window is true (rejected above).
    ignored_keys = frozenset({"sliding_window", "max_window_layers"})

    def model_config_fields(self, hf, where: str) -> dict[str, Any]:
        windowed = [i for i, kind in enumerate(hf.layer_types or []) if kind != "full_attention"]
        if windowed:
            raise ConfigError(f"{where}: layer_types marks layers {windowed} as sliding-window; only full "
                              "attention is implemented for qwen2")
        return {**super().model_config_fields(hf, where), "add_qkv_bias": True}

    def hf_config_values(self, cfg: ModelConfig) -> dict[str, Any]:
        values = super().hf_config_values(cfg)
        values.pop("head_dim")  # Qwen2 derives it from hidden_size / heads
        return {**values, "use_sliding_window": False}

    def attention_rules(self, cfg: ModelConfig, i: int) -> list[WeightRule]:
        if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
            raise ConfigError(f"qwen2 needs kv_channels * num_attention_heads == hidden_size, got "
                              f"{cfg.kv_channels} * {cfg.num_attention_heads} != {cfg.hidden_size}")
        hf, mc = f"model.layers.{i}.self_attn", f"decoder.layers.{i}.self_attention"
        bias = qkv_rule(f"{mc}.linear_qkv.bias", f"{hf}.q_proj.bias", f"{hf}.k_proj.bias", f"{hf}.v_proj.bias",
                        cfg, bias=True)
        return super().attention_rules(cfg, i) + [bias]
