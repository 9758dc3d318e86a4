"""The model description every stage, the converter and the planner share.

One dataclass maps a Hugging Face-style architecture (Llama, Qwen2, Gemma-2) onto Megatron-Core's
`TransformerConfig`; every field is either honoured or rejected, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "qwen2", "gemma2")
# Settings with no tensor of their own: a checkpoint loads under any value of them, and means only one.
FUNCTION_FIELDS = ("family", "rotary_base", "norm_epsilon", "tie_word_embeddings", "attn_logit_softcapping",
                   "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window")
# How attention's weights split into heads. Another split can keep every tensor's shape (4 heads of 32
# channels and 8 of 16 both make 128, and so do their KV groups), so such a checkpoint loads and computes
# something else.
HEAD_LAYOUT_FIELDS = ("num_attention_heads", "num_query_groups", "kv_channels")


def check_checkpoint_model(folder: str, cfg: ModelConfig) -> None:
    """Refuse to load a checkpoint into a model whose function-only settings differ from the ones it was
    saved (or converted from Hugging Face) with; the error lists each, with both values."""
    from megatron_grm.train.checkpoint import read_metadata

    recorded = read_metadata(folder).get("model")
    mismatches = cfg.function_mismatches(recorded) if isinstance(recorded, dict) else []
    if mismatches:
        raise ValueError(f"{folder} was saved for another model configuration; its weights would compute "
                         f"something else here:\n  " + "\n  ".join(mismatches) +
                         "\nset these model.* overrides to the checkpoint's values (or choose its conf/model)")


@dataclass
class ModelConfig:
    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA: number of KV heads; None = MHA
    kv_channels: int | None = None  # head dim; None = hidden / heads
    vocab_size: int = 128
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # only None is supported; anything else is rejected
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False  # Qwen2
    init_method_std: float = 0.02
    # Gemma-2 only
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    # where the tokenizer lives (HF folder, .model file, or a char tokenizer folder)
    tokenizer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not supported; choose one of {FAMILIES}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set model.kv_channels"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.rope_scaling is not None:
            raise ValueError(
                f"model.rope_scaling={self.rope_scaling!r}: RoPE scaling is not implemented; "
                "refusing to silently train with unscaled RoPE"
            )
        if self.family != "gemma2":
            gemma_only = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                          "sliding_window")
            for name in gemma_only:
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name} is a Gemma-2 field; family={self.family!r} does not use it")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def function_mismatches(self, recorded: dict[str, Any]) -> list[str]:
        """The settings that change what the model computes without necessarily changing a tensor's shape,
        where ``recorded`` (the ``model`` a checkpoint's metadata holds) says otherwise: loading those
        weights under this config would run them with another RoPE base, norm epsilon, soft cap, window or
        split into heads."""
        return [f"model.{name}: the checkpoint has {recorded[name]!r}, this run {getattr(self, name)!r}"
                for name in FUNCTION_FIELDS + HEAD_LAYOUT_FIELDS
                if name in recorded and recorded[name] != getattr(self, name)]

    def num_parameters(self, padded_vocab: int | None = None) -> int:
        """Exact parameter count of the built model (used by the planner and MFU)."""
        v = padded_vocab or self.vocab_size
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.add_qkv_bias else 0)
        mlp = h * 2 * f + f * h
        norms = 2 * h + (2 * h if self.family == "gemma2" else 0)
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp + norms) + emb + h

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (forward + backward = 3 × forward), matmuls + attention scores."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        per_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * f) + 2 * 2 * seq_length * q / 2  # causal
        logits = 2 * h * self.vocab_size
        return 3.0 * (L * per_layer + logits)
