"""Memory and step-time planner: will this model, layout and batch fit a GPU, and how long will a step take?

Pure arithmetic over the same :class:`RunConfig` a stage runs with (no torch.distributed, no model build),
so ``tools/plan.py`` answers in a second and refuses a layout before a 128-GPU job is queued. It lives at
the package top level, not in ``train/``, because a plan spans the training step, the rollout engine's KV
cache and GRPO's reference model.

Per GPU, for the heaviest pipeline stage:

- weights, gradients (Megatron DDP keeps fp32 ``main_grad`` buffers) and Adam states, with and without
  the distributed optimizer (mixed precision: 2 + 4 + 12 bytes per parameter, the 12 sharded over DP);
- activations, itemised tensor by tensor as in Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models" (Sec. 4), generalised to GQA, SwiGLU, RMSNorm and to the kernels our
  layer specs run. With the paper's GPT layer the itemisation reduces to its closed forms
  (:func:`korthikanti_layer_bytes`: ``sbh(34 + 5as/h)``, ``sbh(10 + 24/t + 5as/(ht))`` with TP,
  ``sbh/t (34 + 5as/h)`` with TP+SP, the ``5as/h`` term gone with selective recompute, ``2sbh`` with full);
- the rollout engine's KV cache, and the frozen reference model GRPO's KL term needs.

Step time is model FLOPs (:meth:`ModelConfig.flops_per_token`) over ``devices × peak × MFU`` at a stated MFU.
Sampling runs one pipeline stage at a time (the engine does not micro-batch across stages), and a decode
step cannot beat reading the stage's weights and KV cache from HBM (``cluster.memory_bandwidth_gb_s``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.provider import padded_vocab_size
from megatron_grm.train.config import RunConfig, validate

GiB = 1024**3
STAGES = ("sft", "rft", "grpo", "metarm")
RECOMPUTE = (None, "selective", "full")


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class PlanSettings:
    """The ``plan:`` section of a config: what the trainer config does not say about a run."""

    stage: str = "sft"  # sft | rft | grpo | metarm
    mfu: float = 0.40  # model FLOP utilisation assumed for training and teacher-forced forwards
    rollout_mfu: float = 0.10  # decode's FLOP utilisation (small per-step GEMMs); HBM reads are a floor on top
    rollout_tokens_in_flight: int = 0  # KV-cache positions per model replica (the engine's max_tokens_in_flight)
    rollout_sequences_per_step: int = 0  # judgments sampled per optimizer step (GRPO: the global batch)
    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    # Per sequence, what the output layer projects. 0: under trainer.loss_tokens_only an RFT/GRPO judgment
    # (max_new_tokens), otherwise every position.
    loss_positions: int = 0
    reference_model: bool | None = None  # None: only GRPO keeps one (for its KL term)
    reference_offloaded: bool = False  # kept in CPU memory between uses: on the GPU only for its forward
    old_logprobs_forward: bool | None = None  # GRPO's GRPOSettings.old_logprobs_forward (its config's default: off)
    states_resident_during_rollout: bool = True  # grads/optimizer stay on the GPU while sampling
    kernels: str = "auto"  # auto | local | te: which implementation's saved tensors to count
    reserved_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"plan.stage={self.stage!r}; choose one of {STAGES}")
        if self.kernels not in ("auto", "local", "te"):
            raise ValueError(f"plan.kernels={self.kernels!r}; choose auto, local or te")
        if not 0 < self.mfu <= 1 or not 0 < self.rollout_mfu <= 1:
            raise ValueError("plan.mfu and plan.rollout_mfu must be in (0, 1]")

    @property
    def keeps_reference(self) -> bool:
        return self.stage == "grpo" if self.reference_model is None else self.reference_model

    @property
    def recomputes_old_logprobs(self) -> bool:
        """GRPO spends one more policy forward on the old policy's log-probabilities only with several updates
        per rollout (``grpo.updates_per_rollout`` > 1); with one they are the update's own forward."""
        return bool(self.old_logprobs_forward)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> PlanSettings:
        values = {**(defaults or {}), **(values or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown plan field(s): {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Kernels:
    """What the forward pass keeps for backward, per implementation (bytes are per element).

    ``norm_bytes``: one RMSNorm (None = the activation dtype: TE keeps its input; the torch norm of the
    local spec keeps two fp32 tensors, 8 bytes). ``glu_tensors``: ffn-sized tensors the MLP activation
    keeps besides fc2's input (Megatron's unfused SwiGLU: fc1 output (2) + silu output + the offset-added
    linear half = 4; the local spec's SwiGLU on torch's ops, ``models/swiglu.py``: fc1 output + silu output
    = 3; fused, or the CPU's C++ passes: 2; plain GeLU: 1). ``attention``: ``unfused`` (scores materialised),
    ``flash`` (TE fused/flash: no s² term), ``sdpa`` (the local spec's torch SDPA core: like flash, its
    output is the projection's input, plus one additive copy of the batch's mask per micro-batch) or
    ``softcap`` (Gemma-2's unfused core with tanh capping).
    ``v_view``: V is a view of the fused QKV output, so keeping V keeps that whole buffer alive.
    """

    norm_bytes: float | None
    glu_tensors: float
    attention: str
    softmax_fp32: bool = True
    dropout: bool = False
    v_view: bool = True
    rope: bool = True  # RoPE keeps cos/sin per layer (the paper's GPT has learned positions)


LOCAL = Kernels(norm_bytes=8.0, glu_tensors=3.0, attention="sdpa")
TE = Kernels(norm_bytes=None, glu_tensors=4.0, attention="flash")
# The GPT layer of Korthikanti et al.: LayerNorm keeps its 16-bit input, GeLU MLP (4h), dropout everywhere.
KORTHIKANTI = Kernels(norm_bytes=None, glu_tensors=1.0, attention="unfused", softmax_fp32=False, dropout=True,
                      v_view=False, rope=False)


@dataclass(frozen=True)
class Shape:
    """The dimensions one GPU sees: s tokens, b sequences, TP degree t (and whether SP splits s)."""

    s: int
    b: int
    t: int = 1
    sp: bool = False


# What a stage does when its config leaves a setting out (stages/grpo.py GRPOSettings, stages/rft.py
# RFTSettings, rollout SamplingConfig and RolloutEngine): tests/plan checks them against those classes.
STAGE_FALLBACKS = {"max_tokens_in_flight": 32768, "grpo_max_new_tokens": 512, "rft_max_new_tokens": 256,
                   "rft_num_samples": 3, "rft_instruction_ratio": 0.0, "offload_reference": False,
                   "recompute_old_logprobs": True, "updates_per_rollout": 1}


def stage_defaults(run: RunConfig) -> dict[str, Any]:
    """What a stage config (conf/rft.yaml, conf/grpo.yaml) says about sampling, or what the stage does when
    it says nothing: the plan's defaults.

    RFT samples N judgments per example over its whole data set before training; per optimizer step that is
    N for each judgment row of the batch (the rest is instruction data, ``rft.instruction_ratio``), which
    assumes about one kept judgment per sampled example."""
    t, f = run.trainer, STAGE_FALLBACKS
    if isinstance(run.extra.get("grpo"), dict):
        g = run.extra["grpo"]
        new = int(g.get("max_new_tokens", f["grpo_max_new_tokens"]))
        in_flight = int(g.get("max_tokens_in_flight", f["max_tokens_in_flight"]))
        return {"stage": "grpo", "rollout_tokens_in_flight": in_flight, "max_new_tokens": new,
                "max_prompt_tokens": max(0, t.seq_length - new),
                "rollout_sequences_per_step": t.global_batch_size, "reference_model": True,
                "reference_offloaded": bool(g.get("offload_reference", f["offload_reference"])),
                "old_logprobs_forward": bool(g.get("recompute_old_logprobs", f["recompute_old_logprobs"]))
                and int(g.get("updates_per_rollout", f["updates_per_rollout"])) > 1}
    if isinstance(run.extra.get("rft"), dict):
        r = run.extra["rft"]
        new = int((r.get("sampling") or {}).get("max_new_tokens", f["rft_max_new_tokens"]))
        in_flight = int((r.get("rollout") or {}).get("max_tokens_in_flight", f["max_tokens_in_flight"]))
        judgment_rows = t.global_batch_size * (1.0 - float(r.get("instruction_ratio", f["rft_instruction_ratio"])))
        samples = int(r.get("num_samples", f["rft_num_samples"]))
        return {"stage": "rft", "rollout_tokens_in_flight": in_flight, "max_new_tokens": new,
                "max_prompt_tokens": max(0, t.seq_length - new),
                "rollout_sequences_per_step": math.ceil(samples * judgment_rows)}
    return {}


# ------------------------------------------------------------------------------------------ parameters
def layer_parameters(m: ModelConfig, t: int) -> float:
    """Parameters of one transformer layer on one TP rank (norm weights are replicated, not split)."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    h, f = m.hidden_size, m.ffn_hidden_size
    split = h * (q + 2 * kv) + q * h + 3 * h * f + ((q + 2 * kv) if m.add_qkv_bias else 0)
    norms = 2 * h + (2 * h if m.family == "gemma2" else 0)
    return split / t + norms


def stage_parameters(m: ModelConfig, t: int, p: int) -> list[float]:
    """Parameters per GPU of each pipeline stage: its layers, plus embedding (first) and output layer (last).

    With tied embeddings and p > 1 the last stage holds its own copy of the embedding as output layer.
    """
    vocab = padded_vocab_size(m.vocab_size, t)
    per_stage = [m.num_layers // p * layer_parameters(m, t) for _ in range(p)]
    per_stage[0] += vocab * m.hidden_size / t
    if not m.tie_word_embeddings or p > 1:
        per_stage[-1] += vocab * m.hidden_size / t
    per_stage[-1] += m.hidden_size  # final norm
    return per_stage


def gemm_parameters(m: ModelConfig, t: int) -> float:
    """Parameters of one layer's four GEMMs on one TP rank (what Transformer Engine runs in FP8)."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    return (m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size) / t


# Bytes per GEMM parameter of Transformer Engine's FP8 weight copies: on Hopper it keeps the weight in FP8
# row-wise (forward) and column-wise (the data gradient's transposed GEMM). A planning figure from how TE
# caches FP8 weights, not yet measured on a GPU.
FP8_WEIGHT_COPIES = 2.0


def kv_bytes_per_token(m: ModelConfig, tp: int, pp: int, e: float) -> float:
    """KV-cache bytes per token on one GPU: K and V of its stage's layers and its TP share of the KV heads."""
    return 2 * (m.num_layers // pp) * (m.num_query_groups // tp) * m.kv_channels * e


def state_bytes(params: float, params_dtype: str, dp: int, distributed_optimizer: bool) -> dict[str, float]:
    """Weights, fp32 main_grad buffer, and Adam (m, v, plus fp32 master weights when params are bf16)."""
    weight = {"bf16": 2, "fp32": 4}[params_dtype]
    optimizer = 12 if params_dtype == "bf16" else 8  # fp32 params are their own master copy
    shards = dp if distributed_optimizer else 1
    return {"weights": params * weight, "gradients": params * 4.0, "optimizer": params * optimizer / shards}


# ------------------------------------------------------------------------------------------ activations
def layer_activation_terms(m: ModelConfig, x: Shape, e: float, recompute: str | None, k: Kernels,
                           windowed_fraction: float = 0.0, fp8: bool = False) -> dict[str, float]:
    """Bytes one transformer layer keeps for backward on one GPU, by tensor (Korthikanti Sec. 4.1).

    ``fp8``: Transformer Engine's FP8 GEMMs keep their inputs cast to FP8 (1 byte) for the weight gradient.
    """
    s, b, t = x.s, x.b, x.t
    g = 1.0 if fp8 else e  # bytes per element of a GEMM input kept for backward
    h, f, a = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    q_dim, kv_dim = a * m.kv_channels, m.num_query_groups * m.kv_channels
    sbh = s * b * h
    rep = t if x.sp else 1  # tensors outside the TP region: replicated without SP, split by SP
    if recompute == "full":
        return {"layer input": e * sbh / rep}
    norm = k.norm_bytes if k.norm_bytes is not None else e
    n_norms = 4 if m.family == "gemma2" else 2
    terms: dict[str, float] = {
        "norms": n_norms * norm * sbh / rep,
        "qkv input": g * sbh / rep,
        "fc1 input": g * sbh / rep,
        "proj input": g * s * b * q_dim / t,
        "fc2 input": g * s * b * f / t,
        "mlp activation": k.glu_tensors * e * s * b * f / t,
    }
    if k.rope:
        terms["rope cos/sin"] = 4 * e * s * m.kv_channels
    if k.dropout:
        terms["dropout masks"] = 2 * sbh / rep
    groups = a // m.num_query_groups
    qkv_buffer = e * s * b * (q_dim + 2 * kv_dim) / t
    if recompute == "selective" or k.attention in ("flash", "sdpa"):
        # Checkpoint inputs (or what flash attention keeps): q and k after RoPE, v still a view of qkv.
        terms["q, k, v"] = e * s * b * (q_dim + kv_dim) / t + (qkv_buffer if k.v_view else e * s * b * kv_dim / t)
        if k.attention in ("flash", "sdpa") and recompute != "selective":
            terms["softmax stats"] = 4 * b * a * s / t
        return terms
    expanded = e * s * b * q_dim / t  # K and V after repeat_interleave to all query heads
    v_kept = expanded if groups > 1 or not k.v_view else qkv_buffer
    k_kept = expanded if groups > 1 else e * s * b * kv_dim / t
    terms["q, k, v"] = e * s * b * q_dim / t + k_kept + v_kept
    scores = b * a * s * s / t
    if k.attention == "softcap":
        # tanh output (scores dtype), fp32 softmax, probs back in the activation dtype, per-layer window mask
        terms["scores"] = scores * (e + 4 + (e if e != 4 else 0)) + windowed_fraction * b * s * s
    else:
        probs = 4 + (e if e != 4 else 0) if k.softmax_fp32 else e
        terms["scores"] = scores * (probs + (1 + e if k.dropout else 0))
    return terms


def projected_positions(run: RunConfig, settings: PlanSettings) -> int:
    """Positions per sequence the output layer projects (0 = all): the judgment when the trainer projects
    only the loss's tokens (``trainer.loss_tokens_only``) and the stage trains on sampled judgments."""
    if settings.loss_positions:
        return settings.loss_positions
    if run.trainer.loss_tokens_only and settings.stage in ("rft", "grpo"):
        return settings.max_new_tokens
    return 0


def head_activation_terms(m: ModelConfig, x: Shape, e: float, k: Kernels,
                          loss_positions: int = 0) -> dict[str, float]:
    """The last stage's final norm, output-layer input and fp32 cross-entropy softmax (vocab-parallel).

    ``loss_positions`` > 0: the output layer sees only that many positions per sequence (the judgment,
    ``parallel/loss_positions.py``), selected from the full sequence on every TP rank (not split by SP).
    """
    rep = x.t if x.sp else 1
    vocab = padded_vocab_size(m.vocab_size, x.t)
    sbh = x.s * x.b * m.hidden_size
    norm = k.norm_bytes if k.norm_bytes is not None else e
    projected = x.s * x.b if not loss_positions else min(loss_positions, x.s) * x.b
    head_input = e * sbh / rep if not loss_positions else e * projected * m.hidden_size
    terms = {"final norm": norm * sbh / rep, "output-layer input": head_input,
             "cross-entropy (fp32)": 4.0 * projected * vocab / x.t}
    if m.final_logit_softcapping:
        terms["logit soft-cap"] = e * projected * vocab / x.t
    return terms


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: str | None = None) -> float:
    """The paper's closed forms (Table 2) for one GPT layer with 16-bit activations."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h / t * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t)


def activation_bytes(m: ModelConfig, x: Shape, e: float, recompute: str | None, k: Kernels,
                     layers: int, in_flight: int, last_stage: bool, loss_positions: int = 0,
                     fp8: bool = False) -> float:
    """Peak saved-activation bytes of one pipeline stage running 1F1B with ``in_flight`` micro-batches.

    Full recompute keeps every layer's input and, during backward, one layer's activations at a time.
    Selective recompute rebuilds one layer's core attention during its backward: an unfused core's scores
    are alive again then.
    """
    windowed = 0.5 if m.sliding_window else 0.0
    per_layer = sum(layer_activation_terms(m, x, e, recompute, k, windowed, fp8).values())
    # The SDPA core keeps the batch's mask for backward, converted once per forward to an additive
    # float mask shared by all layers; under recompute the checkpoints keep the boolean mask instead.
    mask = 0.0 if k.attention != "sdpa" else x.b * x.s * x.s * (e if recompute is None else 1)
    stored = in_flight * (layers * per_layer + mask)
    head = sum(head_activation_terms(m, x, e, k, loss_positions).values()) if last_stage else 0.0
    if recompute == "full":
        one_layer = sum(layer_activation_terms(m, x, e, None, k, windowed, fp8).values())
        return stored + max(head, one_layer)
    if recompute == "selective":
        rebuilt = layer_activation_terms(m, x, e, None, k, windowed, fp8).get("scores", 0.0)
        return stored + max(head, rebuilt)
    return stored + head


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class StageMemory:
    """Bytes per GPU of one pipeline stage, by component."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    fp8_weights: float = 0.0  # Transformer Engine's cached FP8 copies of the GEMM weights (FP8 runs)
    kv_cache: float = 0.0
    rollout_working: float = 0.0
    reference: float = 0.0
    states_in_rollout: bool = True  # False when grads and optimizer states are offloaded while sampling
    reference_in_rollout: bool = True  # False when the reference model waits in CPU memory

    @property
    def training(self) -> float:
        return self.weights + self.fp8_weights + self.gradients + self.optimizer + self.activations + self.reference

    @property
    def rollout(self) -> float:
        if not (self.kv_cache or self.rollout_working):
            return 0.0
        states = self.gradients + self.optimizer if self.states_in_rollout else 0.0
        reference = self.reference if self.reference_in_rollout else 0.0
        # TE keeps its FP8 weight copies between steps; sampling itself runs in bf16.
        return self.weights + self.fp8_weights + states + reference + self.kv_cache + self.rollout_working

    @property
    def peak(self) -> float:
        return max(self.training, self.rollout)


@dataclass
class Plan:
    run: RunConfig
    settings: PlanSettings
    kernels_name: str
    world: int
    dp: int
    microbatches: int
    stages: list[StageMemory]
    variants: dict[tuple[bool, str | None], tuple[float, float]]  # (dist. optimizer, recompute) -> (training, peak)
    times: dict[str, float] = field(default_factory=dict)
    capacity: float | None = None

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.peak)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.worst.peak + self.settings.reserved_gb * GiB <= self.capacity

    def refusal(self) -> str | None:
        if self.fits:
            return None
        w, t, p = self.worst, self.run.trainer, self.run.parallel
        phase = "rollout" if w.rollout > w.training else "training"
        return (f"does not fit: {w.peak / GiB:.1f} GiB + {self.settings.reserved_gb:.0f} GiB reserved > "
                f"{self.capacity / GiB:.0f} GiB per GPU in the {phase} phase (weights {w.weights / GiB:.1f}, "
                f"grads {w.gradients / GiB:.1f}, optimizer {w.optimizer / GiB:.1f}, activations "
                f"{w.activations / GiB:.1f}, KV cache {w.kv_cache / GiB:.1f}, reference {w.reference / GiB:.1f}) "
                f"with TP={p.tensor_parallel} PP={p.pipeline_parallel} DP={self.dp} "
                f"micro_batch={t.micro_batch_size} seq={t.seq_length} recompute={t.recompute}; "
                "raise TP/PP, enable the distributed optimizer or recompute, or lower the micro-batch")


def resolve_kernels(run: RunConfig, settings: PlanSettings) -> tuple[str, Kernels]:
    """TE's kernels on a GPU cluster (NGC images carry TE), the local spec's elsewhere; Gemma-2 caps softly.

    The MLP's activation follows the model (models/provider.py): on a GPU Llama and Qwen2 take Megatron's
    fused SwiGLU (2 ffn-sized tensors); on the CPU their norms and SwiGLU run the C++ passes
    (``parallel/elementwise_autograd.py``), which keep only their inputs (a norm its input in the activation
    dtype, SwiGLU fc1's output: 2), unless ``trainer.cpu_elementwise_kernels`` is off (torch's: 8 bytes, 3);
    Gemma-2's tanh-GELU GLU is Megatron's unfused one on every device (fc1
    output, GELU output, the offset-added linear half: 4), its norms the local spec's torch ones.
    """
    name = settings.kernels if settings.kernels != "auto" else ("te" if run.cluster.gpu else "local")
    k = TE if name == "te" else LOCAL
    if run.model.family == "gemma2":  # its own unfused core attention on both specs (soft-capping)
        k = dataclasses.replace(k, attention="softcap", glu_tensors=4.0)
    elif run.cluster.gpu:
        k = dataclasses.replace(k, glu_tensors=2.0)
    elif name == "local" and run.trainer.cpu_elementwise_kernels:
        k = dataclasses.replace(k, norm_bytes=None, glu_tensors=2.0)
    return name, k


def stage_memory(run: RunConfig, settings: PlanSettings, k: Kernels, distributed_optimizer: bool,
                 recompute: str | None) -> list[StageMemory]:
    """Memory per GPU of every pipeline stage (stage i of p holds min(p - i, M) micro-batches under 1F1B)."""
    m, p, t = run.model, run.parallel, run.trainer
    dp = p.data_parallel(run.cluster.world_size)
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    e = {"bf16": 2.0, "fp32": 4.0}[run.precision.params_dtype]
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    x = Shape(s=t.seq_length // p.context_parallel, b=t.micro_batch_size, t=tp, sp=p.sequence_parallel)
    kv_per_token = kv_bytes_per_token(m, tp, pp, e)
    rollout_tokens = settings.rollout_tokens_in_flight
    if rollout_tokens:  # the engine holds at least one whole sequence, whatever the cap
        rollout_tokens = max(rollout_tokens, settings.max_prompt_tokens + settings.max_new_tokens)
    fp8 = run.precision.fp8 is not None
    working = 0.0
    if rollout_tokens:  # prefilling a wave: upper bound = everything one layer's forward produces
        wave = max(1, rollout_tokens // max(1, settings.max_prompt_tokens + settings.max_new_tokens))
        # Rollouts run without sequence parallelism (parallel/inference_layout.py): nothing split over TP.
        prefill = Shape(s=max(1, settings.max_prompt_tokens), b=wave, t=tp, sp=False)
        working = sum(layer_activation_terms(m, prefill, e, None, k).values())
    out = []
    for i, params in enumerate(stage_parameters(m, tp, pp)):
        states = state_bytes(params, run.precision.params_dtype, dp, distributed_optimizer)
        out.append(StageMemory(
            weights=states["weights"], gradients=states["gradients"], optimizer=states["optimizer"],
            activations=activation_bytes(m, x, e, recompute, k, m.num_layers // pp, min(pp - i, microbatches),
                                         last_stage=i == pp - 1, loss_positions=projected_positions(run, settings),
                                         fp8=fp8),
            fp8_weights=FP8_WEIGHT_COPIES * gemm_parameters(m, tp) * (m.num_layers // pp) if fp8 else 0.0,
            kv_cache=rollout_tokens * kv_per_token, rollout_working=working,
            reference=states["weights"] if settings.keeps_reference else 0.0,
            states_in_rollout=settings.states_resident_during_rollout,
            reference_in_rollout=not settings.reference_offloaded,
        ))
    return out


def step_times(run: RunConfig, settings: PlanSettings, peak_flops: float | None) -> dict[str, float]:
    """Seconds per optimizer step at the stated MFUs (training, reference forward, sampling)."""
    m, t = run.model, run.trainer
    tokens = t.global_batch_size * t.seq_length
    train_flops = m.flops_per_token(t.seq_length) * tokens
    out = {"model_tflop_per_step": train_flops / 1e12}
    if not peak_flops:
        return out
    cluster = run.cluster.world_size * peak_flops
    # Full recompute runs every layer's forward twice: 4 forwards' worth instead of 3 (forward + backward).
    recompute_factor = 4 / 3 if t.recompute == "full" else 1.0
    out["train_s"] = train_flops * recompute_factor / (cluster * settings.mfu)
    if settings.keeps_reference:
        out["reference_forward_s"] = train_flops / 3 / (cluster * settings.mfu)
    if settings.recomputes_old_logprobs:  # GRPO with updates_per_rollout > 1: one more policy forward per step
        out["old_logprobs_forward_s"] = train_flops / 3 / (cluster * settings.mfu)
    if settings.rollout_sequences_per_step and settings.max_new_tokens:
        out.update(rollout_times(run, settings, peak_flops))
    out["step_s"] = sum(v for k, v in out.items() if k.endswith("_s"))
    return out


def rollout_times(run: RunConfig, settings: PlanSettings, peak_flops: float) -> dict[str, float]:
    """Seconds to sample one step's judgments: prefill, then ``max_new_tokens`` decode steps per wave.

    The engine runs a replica's pipeline stages one after another (no micro-batching across them), so a
    pass costs the sum of its stages and only 1/PP of the GPUs compute at a time. A decode step on a stage
    costs its FLOPs at ``plan.rollout_mfu`` but never less than reading the stage's weights and the wave's
    KV cache from HBM (``cluster.memory_bandwidth_gb_s``; no floor when it is not given).
    """
    m, p, s = run.model, run.parallel, settings
    world, pp, tp = run.cluster.world_size, p.pipeline_parallel, p.tensor_parallel
    dp = p.data_parallel(world)
    e = {"bf16": 2.0, "fp32": 4.0}[run.precision.params_dtype]
    computing = world / pp  # GPUs busy at any moment while sampling
    prefill_flops = m.flops_per_token(s.max_prompt_tokens) / 3 * s.rollout_sequences_per_step * s.max_prompt_tokens
    per_replica = math.ceil(s.rollout_sequences_per_step / dp)
    width = s.max_prompt_tokens + s.max_new_tokens
    rows = min(per_replica, max(1, s.rollout_tokens_in_flight // width)) if s.rollout_tokens_in_flight else per_replica
    waves = math.ceil(per_replica / rows)
    context = s.max_prompt_tokens + s.max_new_tokens // 2  # the mean context a decode step attends to
    stage_flops = rows * m.flops_per_token(context) / 3 / (tp * pp)  # one decode step, one GPU of one stage
    compute = stage_flops / (peak_flops * s.rollout_mfu)
    bandwidth = run.cluster.memory_bandwidth_gb_s
    if bandwidth:
        weights = max(stage_parameters(m, tp, pp)) * e
        memory = (weights + rows * context * kv_bytes_per_token(m, tp, pp, e)) / (bandwidth * 1e9)
    else:
        memory = 0.0
    step = pp * max(compute, memory)
    return {"rollout_prefill_s": prefill_flops / (computing * peak_flops * s.mfu),
            "rollout_decode_s": waves * s.max_new_tokens * step,
            "decode_step_ms": 1e3 * step, "decode_rows": float(rows), "decode_bandwidth_bound": float(memory > compute)}


def make_plan(cfg: dict[str, Any] | RunConfig, memory_gb: float | None = None) -> Plan:
    """Validate the layout like a stage would, then size memory per GPU and time per step."""
    run = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    settings = PlanSettings.from_dict(run.extra.get("plan"), defaults=stage_defaults(run))
    world = run.cluster.world_size
    validate(run, world_size=world)
    if run.parallel.context_parallel > 1:
        raise ValueError(f"parallel.context_parallel={run.parallel.context_parallel}: the Trainer does not split "
                         "micro-batches across context-parallel ranks yet (it refuses such a run), so there is "
                         "no layout to plan; use context_parallel=1")
    if run.trainer.recompute not in RECOMPUTE:
        raise ValueError(f"trainer.recompute={run.trainer.recompute!r}")
    name, k = resolve_kernels(run, settings)
    dist_opt = run.optimizer.use_distributed_optimizer
    stages = stage_memory(run, settings, k, dist_opt, run.trainer.recompute)
    variants = {}
    for d in (True, False):
        for r in RECOMPUTE:
            alt = stage_memory(run, settings, k, d, r)
            variants[(d, r)] = (max(st.training for st in alt), max(st.peak for st in alt))
    gb = memory_gb if memory_gb is not None else run.cluster.memory_gb_per_device
    peak = run.trainer.peak_tflops or run.cluster.peak_tflops_bf16
    dp = run.parallel.data_parallel(world)
    return Plan(run=run, settings=settings, kernels_name=name, world=world, dp=dp,
                microbatches=run.trainer.global_batch_size // (run.trainer.micro_batch_size * dp),
                stages=stages, variants=variants, times=step_times(run, settings, peak * 1e12 if peak else None),
                capacity=gb * GiB if gb else None)


# ------------------------------------------------------------------------------------------ the table
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(plan: Plan, title: str = "") -> str:
    """A fixed-width table: components per pipeline stage, alternatives, step time, verdict."""
    run, s = plan.run, plan.settings
    m, p, t = run.model, run.parallel, run.trainer
    params = m.num_parameters(padded_vocab_size(m.vocab_size, p.tensor_parallel))
    cap = f"{plan.capacity / GiB:.0f} GiB" if plan.capacity else "no limit given"
    lines = [
        f"plan {title}: {m.family} {params / 1e9:.2f}B params on {plan.world} x {run.cluster.gpu or 'CPU'} ({cap})",
        f"  TP={p.tensor_parallel} PP={p.pipeline_parallel} CP={p.context_parallel} DP={plan.dp} "
        f"SP={'on' if p.sequence_parallel else 'off'}  {run.precision.params_dtype}"
        f"{' fp8=' + run.precision.fp8 if run.precision.fp8 else ''}  kernels={plan.kernels_name}  stage={s.stage}",
        f"  micro-batch {t.micro_batch_size} x seq {t.seq_length}, global batch {t.global_batch_size} "
        f"({plan.microbatches} micro-batches per DP rank), recompute={t.recompute}, "
        f"distributed optimizer={'on' if run.optimizer.use_distributed_optimizer else 'off'}",
        "",
        f"  {'per GPU, GiB':<26}" + "".join(f"{'stage ' + str(i):>10}" for i in range(len(plan.stages))),
    ]
    fp8_rows = [("FP8 weight copies (TE)", "fp8_weights")] if any(st.fp8_weights for st in plan.stages) else []
    rows = [("weights", "weights"), *fp8_rows, ("gradients (fp32)", "gradients"), ("optimizer states", "optimizer"),
            ("activations", "activations"), ("reference model", "reference"), ("KV cache (rollout)", "kv_cache"),
            ("rollout working set", "rollout_working"), ("= training phase", "training"),
            ("= rollout phase", "rollout"), ("= peak", "peak")]
    for label, attr in rows:
        lines.append(f"  {label:<26}" + "".join(f"{_gib(getattr(st, attr)):>10}" for st in plan.stages))
    lines += ["", f"  {'GiB, training phase / peak':<30}{'recompute none':>16}{'selective':>16}{'full':>16}"]
    for dist in (True, False):
        cells = []
        for r in RECOMPUTE:
            mark = "*" if (dist == run.optimizer.use_distributed_optimizer and r == t.recompute) else " "
            train, peak = plan.variants[(dist, r)]
            cells.append(f"{train / GiB:.1f} / {peak / GiB:.1f}{mark}")
        lines.append(f"  {'distributed optimizer ' + ('on' if dist else 'off'):<30}"
                     + "".join(f"{c:>16}" for c in cells))
    tm = plan.times
    tflop = tm["model_tflop_per_step"]
    lines += ["", "  model FLOPs per step: " + (f"{tflop / 1e3:.1f} PFLOP" if tflop >= 1e3 else f"{tflop:.3g} TFLOP")]
    if "step_s" in tm:
        parts = [f"train {tm['train_s']:.1f} s (MFU {s.mfu:.0%})"]
        if "reference_forward_s" in tm:
            parts.append(f"reference forward {tm['reference_forward_s']:.1f} s")
        if "old_logprobs_forward_s" in tm:
            parts.append(f"old-policy forward {tm['old_logprobs_forward_s']:.1f} s")
        if "rollout_decode_s" in tm:
            parts.append(f"rollout prefill {tm['rollout_prefill_s']:.1f} s + decode {tm['rollout_decode_s']:.1f} s")
        lines.append(f"  step time ≈ {tm['step_s']:.1f} s = " + " + ".join(parts))
        if "rollout_decode_s" in tm:
            bound = ("HBM-bound: weights + KV cache at cluster.memory_bandwidth_gb_s" if tm["decode_bandwidth_bound"]
                     else f"FLOP-bound at plan.rollout_mfu={s.rollout_mfu:.0%}")
            lines.append(f"  decode: {tm['decode_rows']:.0f} sequences per replica at once, "
                         f"{tm['decode_step_ms']:.1f} ms per token step over {p.pipeline_parallel} stage(s) in turn "
                         f"({bound})")
    if p.pipeline_parallel > 1:
        lines.append(f"  pipeline bubble (1F1B): {(p.pipeline_parallel - 1) / plan.microbatches:.1%} of a step")
    verdict = plan.refusal()
    if plan.capacity is None:
        verdict_line = (f"  NOT CHECKED: worst stage {plan.worst.peak / GiB:.2f} GiB; no memory per device given "
                        "(cluster.memory_gb_per_device or --memory-gb)")
    elif verdict is None:
        verdict_line = (f"  FITS: worst stage {plan.worst.peak / GiB:.1f} GiB + {s.reserved_gb:.0f} GiB reserved "
                        f"<= {cap}")
    else:
        verdict_line = f"  REFUSED: {verdict}"
    lines += ["", verdict_line]
    return "\n".join(lines)
