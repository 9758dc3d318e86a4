"""Trainer settings and the single place a run's configuration is validated before anything is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.parallel.distributed import ParallelLayout


@dataclass
class OptimizerSettings:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "cosine"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    fused_kernel: bool = True  # torch's fused Adam when Megatron falls back to torch's (no TE/apex FusedAdam)
    # A resumed run whose schedule (lr, min_lr, warmup, decay style, decay steps = trainer.max_steps) differs
    # from its checkpoint's is refused; true takes this config's schedule at the checkpoint's step instead
    # (Megatron-LM's --override-opt_param-scheduler), e.g. to lengthen a run by raising trainer.max_steps.
    override_schedule: bool = False


@dataclass
class TrainerSettings:
    max_steps: int = 10
    micro_batch_size: int = 1
    global_batch_size: int = 4
    seq_length: int = 128
    seed: int = 1234
    recompute: str | None = None  # null | selective | full
    log_interval: int = 1
    save_interval: int = 0  # 0 = only at the end
    max_nonfinite_in_a_row: int = 3
    run_dir: str = "runs/default"
    load: str | None = None  # a checkpoint folder to start from (weights only unless it is our run's own)
    peak_tflops: float | None = None  # per device; for MFU. null = cluster.peak_tflops_bf16 (none: not reported)
    exit_after_steps: int | None = None  # stop (with a checkpoint) after this many steps of this process
    loss_tokens_only: bool = True  # output layer + cross-entropy only where the loss reads (parallel/loss_positions.py)
    lazy_grad_zeroing: bool = True  # GEMMs overwrite main_grad instead of a zeroed buffer (parallel/grad_zeroing.py)
    cpu_elementwise_kernels: bool = True  # CPU: RMSNorm/SwiGLU/RoPE on C++ passes (parallel/elementwise_autograd.py)


@dataclass
class ClusterSettings:
    name: str = "local_cpu"
    nodes: int = 1
    devices_per_node: int = 1
    gpu: str | None = None  # e.g. "A100-80GB"; None on CPU
    compute_capability: tuple[int, int] | None = None
    memory_gb_per_device: float | None = None
    peak_tflops_bf16: float | None = None
    memory_bandwidth_gb_s: float | None = None  # HBM bandwidth per device (the planner's decode floor)
    # How long a rank may wait in a collective: replicas idle while another samples an RFT shard or a
    # rank writes a checkpoint wait this long before the job fails (Megatron-LM's --distributed-timeout-minutes).
    distributed_timeout_minutes: int = 30

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


def _build(cls, values: dict[str, Any] | None, where: str):
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s): {unknown}; known: {sorted(known)}")
    return cls(**values)


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelLayout
    precision: PrecisionConfig
    cluster: ClusterSettings
    trainer: TrainerSettings
    optimizer: OptimizerSettings
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's own sections (data, rft, grpo, ...)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RunConfig:
        """Build from a plain dict (Hydra's resolved config). Unknown fields are errors, not ignored."""
        cfg = dict(cfg)
        cluster = dict(cfg.pop("cluster", {}) or {})
        if cluster.get("compute_capability") is not None:
            cluster["compute_capability"] = tuple(cluster["compute_capability"])
        return cls(
            model=ModelConfig.from_dict(dict(cfg.pop("model", {}) or {})),
            parallel=_build(ParallelLayout, cfg.pop("parallel", None), "parallel"),
            precision=_build(PrecisionConfig, cfg.pop("precision", None), "precision"),
            cluster=_build(ClusterSettings, cluster, "cluster"),
            trainer=_build(TrainerSettings, cfg.pop("trainer", None), "trainer"),
            optimizer=_build(OptimizerSettings, cfg.pop("optimizer", None), "optimizer"),
            extra=cfg,
        )


def validate(cfg: RunConfig, world_size: int | None = None, training: bool = True) -> None:
    """Reject a configuration that cannot run, with one clear message, before any model is built.
    ``training=False`` (evaluation): the global batch, which nothing then reads, is not checked."""
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    world = world_size if world_size is not None else cfg.cluster.world_size
    if min(p.tensor_parallel, p.pipeline_parallel, p.context_parallel) < 1:
        raise ValueError("parallel sizes must be >= 1")
    if cfg.cluster.distributed_timeout_minutes < 1:
        raise ValueError(f"cluster.distributed_timeout_minutes={cfg.cluster.distributed_timeout_minutes}; "
                         "must be >= 1")
    if world % p.model_parallel:
        raise ValueError(
            f"TP*CP*PP = {p.tensor_parallel}*{p.context_parallel}*{p.pipeline_parallel} = {p.model_parallel} "
            f"does not divide the world size {world}"
        )
    if m.num_attention_heads % p.tensor_parallel:
        raise ValueError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor_parallel="
            f"{p.tensor_parallel}"
        )
    if m.num_query_groups % p.tensor_parallel:
        raise ValueError(
            f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
            f"parallel.tensor_parallel={p.tensor_parallel}"
        )
    if m.num_layers % p.pipeline_parallel:
        raise ValueError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel={p.pipeline_parallel}"
        )
    if p.sequence_parallel and p.tensor_parallel == 1:
        raise ValueError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
    if p.sequence_parallel and t.seq_length % p.tensor_parallel:
        raise ValueError(f"trainer.seq_length={t.seq_length} must be divisible by parallel.tensor_parallel="
                         f"{p.tensor_parallel} with parallel.sequence_parallel (each TP rank holds an equal slice "
                         "of the sequence)")
    gpu = cfg.cluster.gpu is not None
    if (p.sequence_parallel or p.context_parallel > 1) and not gpu:
        raise ValueError(
            f"cluster={cfg.cluster.name} has no GPU: sequence/context parallelism need Transformer Engine on CUDA"
        )
    cfg.precision.check_hardware(cfg.cluster.compute_capability, cfg.cluster.gpu or f"cluster={cfg.cluster.name}")
    if cfg.precision.fp8 is not None:
        # TE runs a GEMM in FP8 only on [rows % 8, inner % 16] operands (assert_dim_for_fp8_exec).
        tp = p.tensor_parallel
        inner = {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size / tensor_parallel": m.ffn_hidden_size // tp,
                 "attention width (heads x kv_channels) / tensor_parallel": m.num_attention_heads * m.kv_channels // tp}
        bad = {name: value for name, value in inner.items() if value % 16}
        if bad:
            raise ValueError(f"precision.fp8={cfg.precision.fp8!r}: FP8 GEMMs need inner dimensions divisible by 16; "
                             f"these are not: {bad}")
        if t.seq_length % 8:
            raise ValueError(f"precision.fp8={cfg.precision.fp8!r}: trainer.seq_length={t.seq_length} must be a "
                             "multiple of 8 (FP8 GEMMs take rows in multiples of 8)")
        if p.sequence_parallel and (t.seq_length // tp) * t.micro_batch_size % 8:
            raise ValueError(f"precision.fp8={cfg.precision.fp8!r} with sequence parallelism: each TP rank's slice "
                             f"of trainer.seq_length={t.seq_length} / {tp} x micro_batch_size={t.micro_batch_size} "
                             "rows must be a multiple of 8 (TE runs the GEMM on the slice before the all-gather)")
    dp = world // p.model_parallel
    if training and t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*DP = "
            f"{t.micro_batch_size}*{dp}"
        )
    if p.context_parallel > 1 and t.seq_length % (2 * p.context_parallel):
        raise ValueError(f"trainer.seq_length={t.seq_length} must be divisible by 2*context_parallel")
    if t.seq_length > m.max_position_embeddings:
        raise ValueError(
            f"trainer.seq_length={t.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if t.recompute not in (None, "selective", "full"):
        raise ValueError(f"trainer.recompute={t.recompute!r}; choose null, 'selective' or 'full'")
    if cfg.optimizer.decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"optimizer.decay_style={cfg.optimizer.decay_style!r}")
    if cfg.optimizer.warmup_steps >= max(t.max_steps, 1):  # Megatron's scheduler asserts it, without a message
        raise ValueError(f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} must be smaller than "
                         f"trainer.max_steps={t.max_steps} (the learning rate warms up, then decays to the last step)")
