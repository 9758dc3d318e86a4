"""What a family's Hugging Face state-dict adapter is: config mapping + a table of weight rules.

A :class:`WeightRule` says how one Megatron parameter (in its unsharded TP=1/PP=1 layout, global layer
index) is made from one or more HF tensors and back. The table is exhaustive in both directions, so a
tensor that no rule consumes is an error rather than a silent drop. Tensor-parallel sharding and
vocabulary padding are not the adapter's business (see ``hf_convert``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_grm.models.config import ModelConfig

# Fields every transformers config may carry that do not change the weights or the forward pass.
GENERIC_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "initializer_range",
    "_attn_implementation_autoset", "attn_implementation",
    "transformers.js_config",  # transformers.js runtime hints (e.g. its ONNX KV-cache dtype), as in SmolLM2's
})


@dataclass(frozen=True)
class WeightRule:
    """One Megatron parameter <-> the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    merge: Callable[[Sequence[Tensor]], Tensor]  # HF tensors -> Megatron tensor
    split: Callable[[Tensor], Sequence[Tensor]]  # Megatron tensor -> HF tensors


def copy_rule(megatron: str, hf: str, shape: tuple[int, ...]) -> WeightRule:
    return WeightRule(megatron, (hf,), (shape,), lambda ts: ts[0], lambda t: (t,))


def qkv_rule(megatron: str, q: str, k: str, v: str, cfg: ModelConfig, bias: bool = False) -> WeightRule:
    """Megatron's fused QKV: per KV group, [the group's query heads, its key head, its value head]."""
    ng, hd, nq = cfg.num_query_groups, cfg.kv_channels, cfg.num_attention_heads
    per_group = nq // ng
    rest: tuple[int, ...] = () if bias else (cfg.hidden_size,)

    def merge(ts: Sequence[Tensor]) -> Tensor:
        tq, tk, tv = (t.reshape(ng, -1, *rest) for t in ts)
        return torch.cat([tq, tk, tv], dim=1).reshape(-1, *rest)

    def split(t: Tensor) -> Sequence[Tensor]:
        tq, tk, tv = t.reshape(ng, (per_group + 2) * hd, *rest).split([per_group * hd, hd, hd], dim=1)
        return tuple(x.reshape(-1, *rest) for x in (tq, tk, tv))

    shapes = ((nq * hd, *rest), (ng * hd, *rest), (ng * hd, *rest))
    return WeightRule(megatron, (q, k, v), shapes, merge, split)


def glu_rule(megatron: str, gate: str, up: str, cfg: ModelConfig) -> WeightRule:
    """Megatron's gated fc1 (TP=1 layout): [gate; up] stacked along the output dimension."""
    shape = (cfg.ffn_hidden_size, cfg.hidden_size)
    return WeightRule(megatron, (gate, up), (shape, shape), lambda ts: torch.cat(list(ts), dim=0),
                      lambda t: tuple(t.chunk(2, dim=0)))


class ConfigError(ValueError):
    """config.json asks for something the converter does not implement; the message names the field."""


class StateDictAdapter:
    """Base for a family: config.json <-> ModelConfig, and the weight-rule table."""

    family: str
    model_type: str
    architecture: str
    # config.json fields this family reads into ModelConfig
    mapped_keys: frozenset[str] = frozenset()
    # config.json fields that must hold one of the listed values (anything else is not implemented)
    required_values: dict[str, tuple[Any, ...]] = {}
    # config.json fields that are harmless for this family (documented per family)
    ignored_keys: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ config
    def check_config_keys(self, raw: dict[str, Any], where: str) -> None:
        known = GENERIC_CONFIG_KEYS | self.mapped_keys | set(self.required_values) | self.ignored_keys
        unknown = sorted(k for k in raw if k not in known and not k.endswith("_token_id"))
        if unknown:
            raise ConfigError(f"{where}: unsupported field(s) {unknown} for model_type={self.model_type!r}; "
                              "refusing to convert and silently drop them")
        if raw.get("quantization_config"):
            raise ConfigError(f"{where}: quantization_config is set; convert an unquantized checkpoint")

    def hf_config_object(self, raw: dict[str, Any], where: str):
        """transformers' own config class, which normalises old spellings (e.g. rope_theta)."""
        from transformers import AutoConfig

        values = {k: v for k, v in raw.items() if k != "model_type"}
        try:
            hf = AutoConfig.for_model(self.model_type, **values)
        except Exception as exc:
            raise ConfigError(f"{where}: transformers rejects this config ({exc})") from exc
        for key, allowed in self.required_values.items():
            value = getattr(hf, key, None) if key not in raw else raw[key]
            if value not in allowed:
                raise ConfigError(f"{where}: {key}={value!r} is not supported for model_type={self.model_type!r} "
                                  f"(supported: {list(allowed)})")
        return hf

    def config_from_hf(self, raw: dict[str, Any], where: str) -> ModelConfig:
        self.check_config_keys(raw, where)
        fields = self.model_config_fields(self.hf_config_object(raw, where), where)
        try:
            return ModelConfig(family=self.family, **fields)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def model_config_fields(self, hf, where: str) -> dict[str, Any]:
        """ModelConfig fields from a transformers config object."""
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype, token_ids: dict[str, Any]) -> dict[str, Any]:
        """config.json for ``AutoModelForCausalLM`` (built with transformers' class, so its defaults apply)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def rules(self, cfg: ModelConfig) -> list[WeightRule]:
        raise NotImplementedError

    def ignorable_hf_tensor(self, name: str) -> bool:
        """HF tensors that carry no weights (non-persistent buffers some old checkpoints saved)."""
        return name.endswith("rotary_emb.inv_freq")


def rope_theta(hf, where: str) -> float:
    """The RoPE base; any RoPE scaling is rejected with the field named (ModelConfig has no RoPE scaling)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = params.pop("rope_type", "default")
    theta = params.pop("rope_theta", None)
    if rope_type != "default" or params:
        raise ConfigError(f"{where}: rope_scaling/rope_parameters {hf.rope_parameters!r} is not implemented "
                          "(only unscaled RoPE); refusing to convert with a silently different position encoding")
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta")
    return float(theta)
