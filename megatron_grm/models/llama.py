"""Llama <-> Megatron-Core: the Hugging Face state-dict adapter of the llama family.

Megatron-Core's local/TE GPT spec is a Llama layer already (RMSNorm, SwiGLU, RoPE, GQA), so the family
needs no modules of its own; what is here is how ``LlamaForCausalLM`` config and weights map onto it.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.hf_adapter import (
    ConfigError,
    StateDictAdapter,
    WeightRule,
    copy_rule,
    glu_rule,
    qkv_rule,
    rope_theta,
)

LLAMA_MAPPED_KEYS = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters",
})


class LlamaAdapter(StateDictAdapter):
    family = "llama"
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    mapped_keys = LLAMA_MAPPED_KEYS
    required_values = {
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "pretraining_tp": (1, None),
        "attention_dropout": (0.0, 0, None),
        # nanotron's exports (SmolLM2) say false; true would be GPT-J-style interleaved RoPE, which transformers'
        # Llama (and Megatron's, with this config) does not compute
        "rope_interleaved": (False, None),
    }
    # nanotron's exports (SmolLM2) mark their configs with it; it names the format, not an architecture choice
    ignored_keys = frozenset({"is_llama_config"})

    # ------------------------------------------------------------------ config
    def model_config_fields(self, hf, where: str) -> dict[str, Any]:
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        return dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
            kv_channels=head_dim,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            rotary_base=rope_theta(hf, where),
            norm_epsilon=float(hf.rms_norm_eps),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            init_method_std=float(getattr(hf, "initializer_range", 0.02) or 0.02),
        )

    def hf_config_values(self, cfg: ModelConfig) -> dict[str, Any]:
        """The config class's constructor arguments shared by the Llama-like families."""
        return dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            tie_word_embeddings=cfg.tie_word_embeddings,
            initializer_range=cfg.init_method_std,
        )

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype, token_ids: dict[str, Any]) -> dict[str, Any]:
        from transformers import AutoConfig

        if cfg.family != self.family:
            raise ConfigError(f"model.family={cfg.family!r} cannot be exported with the {self.family!r} adapter")
        hf = AutoConfig.for_model(self.model_type, **self.hf_config_values(cfg), **token_ids)
        hf.architectures = [self.architecture]
        hf.dtype = dtype
        values = hf.to_dict()
        # transformers 4 reads rope_theta, not rope_parameters (without it: RoPE base 10000, silently), and its
        # releases before 4.56 read torch_dtype, not dtype.
        values["rope_theta"] = float(cfg.rotary_base)
        values["torch_dtype"] = values["dtype"]
        return values

    # ------------------------------------------------------------------ weights
    def attention_rules(self, cfg: ModelConfig, i: int) -> list[WeightRule]:
        hf, mc = f"model.layers.{i}.self_attn", f"decoder.layers.{i}.self_attention"
        q_size = cfg.num_attention_heads * cfg.kv_channels
        return [
            qkv_rule(f"{mc}.linear_qkv.weight", f"{hf}.q_proj.weight", f"{hf}.k_proj.weight",
                     f"{hf}.v_proj.weight", cfg),
            copy_rule(f"{mc}.linear_proj.weight", f"{hf}.o_proj.weight", (cfg.hidden_size, q_size)),
        ]

    def mlp_rules(self, cfg: ModelConfig, i: int) -> list[WeightRule]:
        hf, mc = f"model.layers.{i}.mlp", f"decoder.layers.{i}.mlp"
        return [
            glu_rule(f"{mc}.linear_fc1.weight", f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight", cfg),
            copy_rule(f"{mc}.linear_fc2.weight", f"{hf}.down_proj.weight", (cfg.hidden_size, cfg.ffn_hidden_size)),
        ]

    def norm_rules(self, cfg: ModelConfig, i: int) -> list[WeightRule]:
        h = (cfg.hidden_size,)
        hf, mc = f"model.layers.{i}", f"decoder.layers.{i}"
        return [
            copy_rule(f"{mc}.input_layernorm.weight", f"{hf}.input_layernorm.weight", h),
            copy_rule(f"{mc}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight", h),
        ]

    def rules(self, cfg: ModelConfig) -> list[WeightRule]:
        h, v = cfg.hidden_size, cfg.vocab_size
        rules = [copy_rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", (v, h))]
        for i in range(cfg.num_layers):
            rules += self.norm_rules(cfg, i) + self.attention_rules(cfg, i) + self.mlp_rules(cfg, i)
        rules.append(copy_rule("decoder.final_layernorm.weight", "model.norm.weight", (h,)))
        if not cfg.tie_word_embeddings:
            rules.append(copy_rule("output_layer.weight", "lm_head.weight", (v, h)))
        return rules
