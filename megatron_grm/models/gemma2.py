"""Gemma-2 on Megatron-Core: the pieces Megatron-Core lacks, as module specs of ours (swaps, not a fork).

Gemma-2 (arXiv 2408.00118) differs from a Llama layer in six places; each is a small module here:

* RMSNorm scales by ``(1 + w)`` (weights stored zero-centred)            -> :class:`Gemma2RMSNorm`
* "sandwich" norms: an RMSNorm *after* attention and after the MLP       -> :func:`post_norm_row_parallel_linear`
  (the norm is folded into the output projection, so Megatron's ``TransformerLayer`` stays as is)
* attention-logit soft-capping, ``query_pre_attn_scalar`` scaling and     -> :func:`core_attention_class`
  sliding-window attention on every other layer (layers 0, 2, 4, ... in Hugging Face numbering)
* embeddings multiplied by sqrt(hidden) (in the activation dtype)          -> :func:`model_class`
* final-logit soft-capping, applied before the loss                       -> :func:`model_class`
* GeGLU with tanh-approximated GELU                                       -> provider's activation choice

The provider calls :func:`transformer_config_overrides`, :func:`layer_spec` and :func:`model_class`;
:class:`Gemma2Adapter` at the end maps ``Gemma2ForCausalLM`` configs and weights onto these modules.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.hf_adapter import ConfigError, WeightRule, copy_rule
from megatron_grm.models.llama import LLAMA_MAPPED_KEYS, LlamaAdapter

# The window of Hugging Face's ``sliding_attention`` layers: a query sees itself and the W - 1 keys before it.
SLIDING_WINDOW_SKIP_FREQ = 2  # Megatron layer_number (1-based) % 2 != 0 -> windowed, i.e. HF indices 0, 2, ...


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """Gemma-2's ``cap * tanh(x / cap)``: bounds logits smoothly; ``None`` or 0 leaves them unchanged."""
    if not cap:
        return x
    return cap * torch.tanh(x / cap)


def transformer_config_overrides(cfg: ModelConfig) -> dict[str, Any]:
    """TransformerConfig fields Gemma-2 sets differently from the shared Llama-style defaults."""
    overrides: dict[str, Any] = {
        # Read by TE norms (TE spec); our local norms are (1 + w) by construction.
        "layernorm_zero_centered_gamma": True,
    }
    if cfg.query_pre_attn_scalar is not None:
        overrides["softmax_scale"] = 1.0 / math.sqrt(cfg.query_pre_attn_scalar)
    if cfg.sliding_window is not None:
        if cfg.sliding_window < 1:
            raise ValueError(f"model.sliding_window={cfg.sliding_window} must be >= 1 (or null for none)")
        # Megatron's (left, right) window: left = keys before the query that stay visible.
        overrides["window_size"] = (cfg.sliding_window - 1, 0)
        overrides["window_attn_skip_freq"] = SLIDING_WINDOW_SKIP_FREQ
    return overrides


class Gemma2RMSNorm(torch.nn.Module):
    """RMSNorm computing in fp32 and scaling by ``(1 + weight)``, exactly as Hugging Face's Gemma2RMSNorm.

    Megatron's ``layernorm_zero_centered_gamma`` does this with TE norms only; the torch norm of the local
    spec refuses it, hence this module. The weight starts at zero (= unit scale).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # Megatron all-reduces grads of sequence-parallel norm weights by this attribute.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def _row_parallel_linear_with_post_norm(linear_cls: type, norm_cls: type) -> type:
    """A row-parallel output projection followed by Gemma's post-norm, usable where linear_proj/fc2 go."""

    class PostNormLinear(linear_cls):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs: Any) -> None:
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_norm = norm_cls(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            out, bias = super().forward(x, *args, **kwargs)
            if bias is not None:  # the norm must see the biased output; Gemma-2 has no linear biases
                raise ValueError("Gemma-2 post-norm projection expects add_bias_linear=False")
            return self.post_norm(out), None

    PostNormLinear.__name__ = PostNormLinear.__qualname__ = f"PostNorm{linear_cls.__name__}"
    return PostNormLinear


def _local_post_norm_linear() -> type:
    from megatron.core.tensor_parallel import RowParallelLinear

    return _row_parallel_linear_with_post_norm(RowParallelLinear, Gemma2RMSNorm)


@functools.cache
def post_norm_row_parallel_linear(use_te: bool) -> type:
    """RowParallelLinear + Gemma2RMSNorm (local) or TERowParallelLinear + TENorm (TE, zero-centred gamma)."""
    if not use_te:
        return _local_post_norm_linear()
    from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear

    return _row_parallel_linear_with_post_norm(TERowParallelLinear, TENorm)


def _core_attention_class() -> type:
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.utils import is_layer_window_attention

    class Gemma2CoreAttention(DotProductAttention):
        """Unfused attention with Gemma-2's logit soft-capping and sliding window.

        Scores are ``softcap(q·k * softmax_scale)`` (softmax_scale = 1/sqrt(query_pre_attn_scalar) from the
        config); the window mask is combined with (not substituted for) the incoming mask, so packed
        sequences keep their document boundaries on windowed layers.
        """

        def __init__(self, config, layer_number: int, *args: Any, logit_softcap: float | None = None,
                     **kwargs: Any) -> None:
            super().__init__(config, layer_number, *args, **kwargs)
            if config.apply_query_key_layer_scaling:
                raise ValueError("Gemma-2 attention does not support apply_query_key_layer_scaling")
            self.logit_softcap = logit_softcap
            windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
            self.window_left = config.window_size[0] if windowed else None

        def _mask(self, attention_mask: Tensor | None, sq: int, sk: int, device: torch.device) -> Tensor:
            """Bool [.., sq, sk], True = masked. No mask means causal (queries are the last sq positions)."""
            q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
            k_pos = torch.arange(sk, device=device)[None, :]
            mask = k_pos > q_pos if attention_mask is None else attention_mask.bool()
            if self.window_left is not None:
                mask = mask | (q_pos - k_pos > self.window_left)
            return mask

        def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("Gemma-2 core attention supports neither packed_seq_params nor attention_bias")
            sq, b, n, hn = query.shape
            sk = key.shape[0]
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
            q = query.permute(1, 2, 0, 3)  # [b, n, sq, hn]
            k = key.permute(1, 2, 3, 0)  # [b, n, hn, sk]
            v = value.permute(1, 2, 0, 3)  # [b, n, sk, hn]
            scores = soft_cap(torch.matmul(q, k) * self.softmax_scale, self.logit_softcap)
            mask = self._mask(attention_mask, sq, sk, scores.device)
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            if self.training and self.attention_dropout.p > 0:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    probs = self.attention_dropout(probs)
            context = torch.matmul(probs, v)  # [b, n, sq, hn]
            return context.permute(2, 0, 1, 3).reshape(sq, b, n * hn)

    return Gemma2CoreAttention


@functools.cache
def core_attention_class() -> type:
    """The Gemma-2 core attention (built lazily so importing this module does not import Megatron)."""
    return _core_attention_class()


def layer_spec(cfg: ModelConfig, use_te: bool):
    """Megatron's TransformerLayer with Gemma-2's norms, attention core and post-norm projections.

    Checkpoint keys follow the TE layout (pre-norms as ``linear_qkv.layer_norm_weight`` /
    ``linear_fc1.layer_norm_weight``), so local-spec and TE-spec checkpoints are interchangeable.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te:
        from megatron_grm.parallel.device import have_transformer_engine

        if not have_transformer_engine():  # Megatron-Core puts placeholders where TE classes would be
            raise RuntimeError("the Gemma-2 Transformer Engine spec needs transformer_engine; use use_te=False")
    core_attention = functools.partial(core_attention_class(), logit_softcap=cfg.attn_logit_softcapping)
    post_norm_linear = post_norm_row_parallel_linear(use_te)
    if use_te:  # untested on CPU (no Transformer Engine here): the pre-norms fuse into the column linears
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        pre_norm, qkv_linear, fc1_linear, keys_map = IdentityOp, TELayerNormColumnParallelLinear, \
            TELayerNormColumnParallelLinear, {}
    else:
        pre_norm, qkv_linear, fc1_linear = Gemma2RMSNorm, ColumnParallelLinear, ColumnParallelLinear
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv_linear,
                    core_attention=core_attention,
                    linear_proj=post_norm_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1_linear, linear_fc2=post_norm_linear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _specialise(module: torch.nn.Module, cls: type) -> None:
    """Turn a module GPTModel built into a subclass instance that only overrides ``forward``.

    GPTModel constructs its embedding and output layer itself; re-classing those instances keeps
    Megatron's construction, parameter names, tying and sharded_state_dict untouched.
    """
    added = {name for name in cls.__dict__ if not name.startswith("__")} - {"forward"}
    if not isinstance(module, cls.__mro__[1]) or added:
        raise TypeError(f"{cls.__name__} must directly subclass {type(module).__name__} and add only forward")
    module.__class__ = cls


def _model_class() -> type:
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    class ScaledEmbedding(LanguageModelEmbedding):
        """Embedding output times sqrt(hidden), the factor rounded to the weight dtype as in Hugging Face."""

        def forward(self, *args: Any, **kwargs: Any) -> Tensor:
            out = super().forward(*args, **kwargs)
            dtype = self.word_embeddings.weight.dtype
            return out * torch.tensor(self.config.hidden_size**0.5, dtype=dtype).to(out.dtype)

    class SoftCappedOutputLayer(ColumnParallelLinear):
        """The LM head with Gemma-2's final-logit soft-capping, so GPTModel's loss sees capped logits."""

        def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            logits, bias = super().forward(*args, **kwargs)
            return soft_cap(logits, self.final_logit_softcapping), bias

    class Gemma2GPTModel(GPTModel):
        """GPTModel with Gemma-2's embedding scaling, (1 + w) final norm and final-logit soft-capping."""

        def __init__(self, config, transformer_layer_spec, *args: Any,
                     final_logit_softcapping: float | None = None, **kwargs: Any) -> None:
            if isinstance(transformer_layer_spec, ModuleSpec):
                # Same layer list Megatron builds for this stage, but with a (1 + w) final norm.
                layers = get_num_layers_to_build(config, kwargs.get("vp_stage"))
                transformer_layer_spec = TransformerBlockSubmodules(
                    layer_specs=[transformer_layer_spec] * layers, layer_norm=Gemma2RMSNorm)
            super().__init__(config, transformer_layer_spec, *args, **kwargs)
            if self.pre_process:
                _specialise(self.embedding, ScaledEmbedding)
            if self.post_process:
                _specialise(self.output_layer, SoftCappedOutputLayer)
                self.output_layer.final_logit_softcapping = final_logit_softcapping

    return Gemma2GPTModel


@functools.cache
def _gemma2_gpt_model() -> type:
    return _model_class()


def model_class(cfg: ModelConfig):
    """The GPTModel subclass to build, bound to this config's final-logit soft-cap (not a TransformerConfig field)."""
    return functools.partial(_gemma2_gpt_model(), final_logit_softcapping=cfg.final_logit_softcapping)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face state-dict adapter (Gemma2ForCausalLM <-> the modules above)
# ---------------------------------------------------------------------------------------------------------
class Gemma2Adapter(LlamaAdapter):
    """Gemma-2's four norms per layer (stored zero-centred, as our (1 + w) norms use them) and its extras."""

    family = "gemma2"
    model_type = "gemma2"
    architecture = "Gemma2ForCausalLM"
    # sliding_window_size: google's gemma-2-9b/27b configs repeat the window under this name (transformers
    # reads sliding_window); accepted only when the two agree.
    mapped_keys = LLAMA_MAPPED_KEYS | {"query_pre_attn_scalar", "attn_logit_softcapping",
                                       "final_logit_softcapping", "sliding_window", "layer_types",
                                       "sliding_window_size"}
    required_values = {
        "hidden_activation": ("gelu_pytorch_tanh",),
        "attention_bias": (False,),
        "attention_dropout": (0.0, 0, None),
        "use_bidirectional_attention": (False, None),
    }
    # hidden_act: Gemma-2 reads hidden_activation; cache_implementation: a generation setting.
    ignored_keys = frozenset({"hidden_act", "cache_implementation"})

    def model_config_fields(self, hf, where: str) -> dict[str, Any]:
        size = getattr(hf, "sliding_window_size", None)
        if size is not None and size != hf.sliding_window:
            raise ConfigError(f"{where}: sliding_window_size={size!r} differs from sliding_window="
                              f"{hf.sliding_window!r}; which window the model was trained with is ambiguous")
        kinds = list(hf.layer_types or [])
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(kinds))]
        if kinds == alternating and any(kind == "sliding_attention" for kind in kinds):
            if hf.sliding_window is None:
                raise ConfigError(f"{where}: sliding_window is null, but layer_types has sliding-window layers")
            window = int(hf.sliding_window)
        elif all(kind == "full_attention" for kind in kinds):
            window = None
        else:
            raise ConfigError(f"{where}: layer_types {kinds} is not Gemma-2's pattern (sliding window on "
                              "layers 0, 2, 4, ... or on none)")
        return {
            **super().model_config_fields(hf, where),
            "attn_logit_softcapping": _float_or_none(hf.attn_logit_softcapping),
            "final_logit_softcapping": _float_or_none(hf.final_logit_softcapping),
            "query_pre_attn_scalar": float(hf.query_pre_attn_scalar),
            "sliding_window": window,
        }

    def hf_config_values(self, cfg: ModelConfig) -> dict[str, Any]:
        kinds = ["sliding_attention" if cfg.sliding_window and i % 2 == 0 else "full_attention"
                 for i in range(cfg.num_layers)]
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.kv_channels
        return {
            **super().hf_config_values(cfg),
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            # transformers' Gemma2Model builds its sliding mask on every forward and refuses a null window:
            # without one, every layer is full attention and the window spans any position (no effect).
            "sliding_window": cfg.sliding_window or cfg.max_position_embeddings,
            "layer_types": kinds,
        }

    def norm_rules(self, cfg: ModelConfig, i: int) -> list[WeightRule]:
        h = (cfg.hidden_size,)
        hf, mc = f"model.layers.{i}", f"decoder.layers.{i}"
        return [
            copy_rule(f"{mc}.input_layernorm.weight", f"{hf}.input_layernorm.weight", h),
            copy_rule(f"{mc}.self_attention.linear_proj.post_norm.weight",
                      f"{hf}.post_attention_layernorm.weight", h),
            copy_rule(f"{mc}.pre_mlp_layernorm.weight", f"{hf}.pre_feedforward_layernorm.weight", h),
            copy_rule(f"{mc}.mlp.linear_fc2.post_norm.weight", f"{hf}.post_feedforward_layernorm.weight", h),
        ]



def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
