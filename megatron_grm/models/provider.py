"""Build Megatron-Core's GPTModel for a model family, on the layer spec this machine can run.

Transformer Engine spec when TE and CUDA are present, Megatron-Core's local spec otherwise; the
family decides only what differs (Gemma-2 brings its own modules), the rest is shared.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.parallel.distributed import ParallelLayout

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 × TP so every TP shard is equal and aligned."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


def transformer_config(
    cfg: ModelConfig,
    layout: ParallelLayout,
    precision: PrecisionConfig,
    recompute: str | None = None,
    use_cpu_initialization: bool | None = None,
    wgrad_fusion: bool = False,
):
    """Map our ModelConfig one-to-one onto Megatron-Core's TransformerConfig. ``wgrad_fusion``: weight
    gradients accumulate inside the GEMM into DDP's ``main_grad`` (where a kernel for it exists); only for
    a model the Trainer wraps in DDP, since a backward without ``main_grad`` buffers would fail."""
    from megatron.core.transformer import TransformerConfig

    from megatron_grm.parallel.device import use_cuda, wgrad_accumulation_fusion_available

    if recompute not in (None, "full", "selective"):
        raise ValueError(f"trainer.recompute={recompute!r}; choose null, 'selective' or 'full'")
    bf16 = precision.params_dtype == "bf16"
    activation = F.silu if cfg.family in ("llama", "qwen2") else _gelu_tanh
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=activation,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        context_parallel_size=layout.context_parallel,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=precision.torch_dtype,
        pipeline_dtype=precision.torch_dtype,
        bf16=bf16,
        autocast_dtype=precision.torch_dtype,
        use_cpu_initialization=(not use_cuda()) if use_cpu_initialization is None else use_cpu_initialization,
        # The fused kernels are CUDA-only (on CPU Megatron's jit_fuser would call torch.compile); the TE spec
        # fuses attention and norms by itself. Megatron fuses SwiGLU (Llama, Qwen2), not Gemma-2's tanh GELU:
        # the fused SwiGLU keeps 2 instead of 4 ffn-sized activations per layer.
        bias_activation_fusion=use_cuda() and activation is F.silu,
        # On CPU the local spec's MLP takes its SwiGLU from the spec (models/swiglu.py; see layer_spec).
        use_te_activation_func=cpu_swiglu(cfg),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=wgrad_fusion and wgrad_accumulation_fusion_available(),
        calculate_per_token_loss=True,
    )
    if precision.fp8 is not None:
        kwargs.update(fp8=precision.fp8, fp8_recipe="delayed" if precision.fp8 == "hybrid" else "tensorwise",
                      fp8_margin=precision.fp8_margin, fp8_amax_history_len=precision.fp8_amax_history_len,
                      fp8_amax_compute_algo=precision.fp8_amax_compute_algo)
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    if cfg.family == "gemma2":
        from megatron_grm.models import gemma2

        kwargs.update(gemma2.transformer_config_overrides(cfg))
    return TransformerConfig(**kwargs)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def cpu_swiglu(cfg: ModelConfig) -> bool:
    """Whether the local spec's MLP uses :class:`~megatron_grm.models.swiglu.SwiGLU` (Llama/Qwen2 without
    CUDA, where Megatron's fused SwiGLU is unavailable). Decides the config flag and the spec together."""
    from megatron_grm.parallel.device import use_cuda

    return cfg.family in ("llama", "qwen2") and not use_cuda()


def layer_spec(cfg: ModelConfig, use_te: bool):
    """Megatron-Core's TE or local spec for Llama/Qwen2 (local: with the SDPA core); Gemma-2 brings its own."""
    if cfg.family == "gemma2":
        from megatron_grm.models import gemma2

        return gemma2.layer_spec(cfg, use_te)
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    from megatron_grm.models.sdpa_attention import sdpa_core_attention_class

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
    if cpu_swiglu(cfg):
        from megatron_grm.models.rms_norm import RMSNorm
        from megatron_grm.models.swiglu import SwiGLU

        spec.submodules.mlp.submodules.activation_func = SwiGLU
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def decoder_spec(cfg: ModelConfig, use_te: bool, config: TransformerConfig):
    """What GPTModel builds its decoder from: :func:`layer_spec`, or where that spec's norms are
    :class:`~megatron_grm.models.rms_norm.RMSNorm` (CPU, Llama/Qwen2) the block's submodules, so that the
    final norm is one too (Megatron builds it from its own default otherwise)."""
    spec = layer_spec(cfg, use_te)
    if use_te or not cpu_swiglu(cfg):
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_grm.models.rms_norm import RMSNorm

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def build_model(
    cfg: ModelConfig,
    layout: ParallelLayout,
    precision: PrecisionConfig,
    recompute: str | None = None,
    use_te: bool | None = None,
    vocab_size: int | None = None,
    wgrad_fusion: bool = False,
):
    """The GPTModel chunk for this pipeline stage (parallel state must be initialised); ``wgrad_fusion``
    for a model headed for the Trainer (see :func:`transformer_config`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_grm.parallel.device import device, log_backend_choice, use_te_spec
    from megatron_grm.parallel.wgrad_gemm import kernel_in_use

    use_te = use_te_spec() if use_te is None else use_te
    if precision.fp8 is not None and not use_te:
        raise ValueError(f"precision.fp8={precision.fp8!r}: FP8 GEMMs are Transformer Engine's, and this model is "
                         "built with the local spec (Transformer Engine missing or no GPU), where Megatron would "
                         "train in bf16 without a word; install TE (the NGC image has it) or use precision=bf16")
    log_backend_choice()
    config = transformer_config(cfg, layout, precision, recompute, wgrad_fusion=wgrad_fusion)
    if wgrad_fusion and config.gradient_accumulation_fusion:
        log.info("weight gradients: accumulated inside the GEMM into main_grad (%s)", kernel_in_use())
    elif wgrad_fusion:
        log.info("weight gradients: through .grad and DDP's hook (no fused weight-gradient kernel)")
    model_cls = GPTModel
    if cfg.family == "gemma2":
        from megatron_grm.models import gemma2

        model_cls = gemma2.model_class(cfg)
    model = model_cls(
        config=config,
        transformer_layer_spec=decoder_spec(cfg, use_te, config),
        vocab_size=vocab_size or padded_vocab_size(cfg.vocab_size, layout.tensor_parallel),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=float(cfg.rotary_base),  # RotaryEmbedding computes base ** (2i/d) in float: no need to truncate
    )
    if use_te:
        refuse_masks_the_core_ignores(model)
    if wgrad_fusion:  # a model headed for DDP: the embedding's rows go straight into main_grad too
        from megatron_grm.parallel import embedding_grad

        embedding_grad.install(model)
    cast = params_to_dtype(model, config.params_dtype)
    if cast:
        log.info("%d parameter(s) the layer spec left in another dtype cast to %s (norm weights of the local spec)",
                 cast, config.params_dtype)
    return model.to(device())


def params_to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Every floating-point parameter in ``dtype``; returns how many were cast.

    The local spec's torch norms ignore ``params_dtype`` and keep fp32 weights in a bf16 model. Megatron's
    own bf16 training casts the whole model (``Float16Module``), and its non-distributed mixed-precision
    optimizer (one data-parallel rank) keys its checkpoint by the 16-bit parameters only: a single fp32
    weight made every bf16 save on one rank fail ("Param id ... does not match any model sharded param").
    """
    cast = 0
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def refuse_masks_the_core_ignores(model: torch.nn.Module, core_cls: type | None = None) -> int:
    """TE's causal core attention (``TEDotProductAttention``) attends causally and ignores the attention
    mask. The stages' batches are one document per row, right-padded, where that gives every position
    anything reads the same result; a packed batch's block-diagonal mask would silently attend across
    documents, so training refuses it. Returns how many core attentions are guarded."""
    if core_cls is None:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention as core_cls
    cores = [m for m in model.modules() if type(m) is core_cls]
    for core in cores:
        core.register_forward_pre_hook(_refuse_an_ignored_mask, with_kwargs=True)
    return len(cores)


def _refuse_an_ignored_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    from megatron_grm.models.sdpa_attention import mask_plan

    if not module.training:  # inference passes its own (e.g. decode-step) masks under causal kernels
        return
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    # A causal plan is exactly one right-padded document per row (cached per mask tensor).
    if mask is not None and not mask_plan(mask, torch.float32).is_causal:
        raise ValueError(
            f"{type(module).__name__} attends causally and ignores this attention mask (shape "
            f"{tuple(mask.shape)}: not one right-padded document per row, e.g. packed documents); train such "
            "batches with the local spec (use_te=False) or one document per row")
