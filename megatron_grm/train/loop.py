"""The one training loop every stage uses: RFT/SFT, GRPO and MetaRM differ only by batch producer and objective.

    for step in range(start, max_steps):
        microbatches = producer.next_batch(step)                 # this DP rank's share of the global batch
        loss = forward_backward(microbatches, objective)         # Megatron's schedule (PP-aware)
        optimizer.step(); scheduler.step()                       # Megatron DDP + (distributed) optimizer
        log(); maybe_checkpoint()
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from megatron_grm.models.config import check_checkpoint_model
from megatron_grm.models.provider import build_model
from megatron_grm.parallel import elementwise_autograd
from megatron_grm.parallel.device import device, to_device
from megatron_grm.parallel.distributed import true_on_any_rank
from megatron_grm.parallel.fused_adam import use_fused_adam
from megatron_grm.parallel.grad_zeroing import GradZeroing
from megatron_grm.parallel.loss_positions import LossPositions, output_at
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.config import RunConfig
from megatron_grm.train.grad_guard import skip_nonfinite_updates
from megatron_grm.train.logger import RunLogger
from megatron_grm.train.losses import LossOutput
from megatron_grm.train.signals import exit_for_requeue, stop_request

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class BatchProducer(Protocol):
    """Yields this DP rank's micro-batches for a step; its state makes resume exact."""

    def next_batch(self, step: int) -> list[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """What a stage optimises: how to run the model on a micro-batch and the loss on its output."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput: ...


def token_nll_forward(model: torch.nn.Module, batch: Batch, loss_tokens_only: bool = True) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels``, ``[batch, seq]`` (vocab-parallel, so exact under TP).

    ``loss_tokens_only``: the output layer and cross-entropy run only where ``loss_mask`` is non-zero
    (``parallel/loss_positions.py``); the other positions read 0. On a pipeline stage without the output
    layer the model's hidden states pass through untouched. A batch without ``attention_mask`` gets
    Megatron's causal mask type (on a GPU: TE's fused/flash kernels).
    """
    mask = batch.get("attention_mask")
    if not loss_tokens_only:
        return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    positions = LossPositions(batch["loss_mask"])
    with output_at(model, positions) as last_stage:
        out = model(batch["tokens"], batch["position_ids"], mask, labels=positions.gather(batch["labels"]))
    return positions.scatter(out) if last_stage else out


@dataclass
class StepResult:
    step: int
    loss: float
    metrics: dict[str, float]
    grad_norm: float | None
    skipped: bool
    seconds: float
    tokens: int  # non-padding tokens, over all data-parallel ranks
    flops: float  # model FLOPs of those tokens, each document at its own length (ModelConfig.flops_per_token)
    batch_tokens: int = 0  # every position of the micro-batches, padding included
    lr: float = 0.0  # the learning rate this step ran with (the scheduler has moved on by the time it is logged)


def document_lengths(batch: Batch) -> list[int]:
    """Lengths of the documents in a micro-batch, read from ``position_ids`` (which restart at 0 for each
    document and are 0 on padding): a document ends where its positions stop rising. Padding counts for
    nothing, nor does a one-token document (indistinguishable from padding; it does no real work). A batch
    without position ids counts every position, one document per row."""
    positions = batch.get("position_ids")
    if positions is None:
        return [int(batch["tokens"].shape[1])] * int(batch["tokens"].shape[0])
    following = torch.cat([positions[:, 1:], torch.zeros_like(positions[:, :1])], dim=1)
    ends = (positions > 0) & (following == 0)
    return [int(p) + 1 for p in positions[ends].tolist()]


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    nonfinite_in_a_row: int = 0
    history: list[float] = field(default_factory=list)


def choose_distributed_optimizer(requested: bool, dp_size: int, saved: bool | None) -> bool:
    """Megatron's distributed optimizer when asked for and there is more than one data-parallel rank —
    unless the run resumes a checkpoint, whose optimizer kind is kept.

    With one DP rank the distributed optimizer shards nothing and only adds a one-rank reduce-scatter +
    all-gather with full-buffer copies per step (docs/performance.md: ~6% of a step). But the two kinds
    store their state under different keys, so a run resumed on another number of DP ranks (a requeue on
    fewer nodes, a one-GPU debug run continued on a node) keeps the kind its checkpoint was written with:
    the distributed one loads at any DP size, and the plain one fits wherever the one-rank run fitted.
    """
    default = requested and dp_size > 1
    if saved is None or saved == default:
        return default
    log.warning("resuming a checkpoint written with the %s optimizer at %d data-parallel rank(s): keeping it",
                "distributed" if saved else "plain (non-distributed)", dp_size)
    return saved


def saved_optimizer_kind(ckpt_root: str) -> bool | None:
    """Whether the checkpoint this run would resume used the distributed optimizer (None: nothing to resume,
    a weights-only step-0 checkpoint, or one written before the kind was recorded)."""
    folder = ckpt.latest_checkpoint(ckpt_root)
    if folder is None:
        return None
    metadata = ckpt.read_metadata(folder)
    if int(metadata.get("step", 0)) == 0:
        return None
    return metadata.get("distributed_optimizer")


SCHEDULE_FIELDS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "optimizer.warmup_steps",
                   "lr_decay_steps": "trainer.max_steps", "lr_decay_style": "optimizer.decay_style",
                   "start_wd": "optimizer.weight_decay"}


def schedule_differences(run: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """'<setting>: the checkpoint has X, this run Y' for each schedule value (scheduler state dicts) that differs."""
    return [f"{setting}: the checkpoint has {saved[key]}, this run {run[key]}"
            for key, setting in SCHEDULE_FIELDS.items() if key in saved and saved[key] != run[key]]


class Trainer:
    """Owns the model chunk, DDP wrapper, optimizer, scheduler, logger and checkpoints of one run."""

    def __init__(self, cfg: RunConfig, metadata: dict[str, Any] | None = None, model=None) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        if cfg.parallel.context_parallel > 1:
            # Megatron's model expects each CP rank's own sequence chunks and a loss reduced over DP x CP;
            # this loop feeds whole sequences and reduces over DP. Refuse rather than train wrongly.
            raise NotImplementedError(
                f"parallel.context_parallel={cfg.parallel.context_parallel}: the Trainer does not split "
                "micro-batches across context-parallel ranks yet; use context_parallel=1")
        self.cfg = cfg
        t, o = cfg.trainer, cfg.optimizer
        self.metadata = {"model": cfg.model.to_dict(), **(metadata or {})}
        raw = model if model is not None else build_model(cfg.model, cfg.parallel, cfg.precision, t.recompute,
                                                          wgrad_fusion=True)
        self.config = raw.config
        self.ckpt_root = os.path.join(t.run_dir, "checkpoints")
        self.distributed_optimizer = choose_distributed_optimizer(
            o.use_distributed_optimizer, _dp_size(), saved_optimizer_kind(self.ckpt_root))
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=raw)
        self.grad_zeroing = GradZeroing(self.model, enabled=t.lazy_grad_zeroing)  # through zero_grad_buffer
        elementwise_autograd.enable(t.cpu_elementwise_kernels, device())
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=cfg.precision.params_dtype == "bf16",
                params_dtype=cfg.precision.torch_dtype,
                use_distributed_optimizer=self.distributed_optimizer,
            ),
            [self.model],
        )
        skip_nonfinite_updates(self.optimizer)
        if o.fused_kernel:
            use_fused_adam(self.optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(t.max_steps, 1),
            lr_decay_style=o.decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(t.max_steps, 1),
            wd_incr_style="constant",
        )
        self.config.finalize_model_grads_func = self.grad_zeroing.finalize_after(finalize_model_grads)
        self.config.no_sync_func = self.model.no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.state = TrainState()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.logger = RunLogger(t.run_dir, enabled=rank == world - 1)  # the last PP stage holds the loss
        self.stop = stop_request()  # installed when the stage started (stages.common.run_stage), else now

    # ----------------------------------------------------------------- one step
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def forward_backward(
        self, microbatches: list[Batch], objective: Objective, forward_only: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run Megatron's schedule; returns the DP-reduced (numerator/denominator) loss and metric pairs."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[Batch], model):
            batch = to_device(next(data_iterator))
            output = objective.forward(model, batch)
            return output, partial(objective.loss, batch=batch)

        seq = microbatches[0]["tokens"].shape[1]
        mbs = microbatches[0]["tokens"].shape[0]
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        totals: dict[str, torch.Tensor] = {}
        for item in reduced:
            for name, pair in item.items():
                totals[name] = totals.get(name, 0) + pair.detach().double()
        # Reduce over DP and broadcast from the last PP stage so every rank sees the same numbers.
        names = sorted(totals)
        # On every stage the same device: with "cpu:gloo,cuda:nccl" a collective's backend follows the tensor.
        flat = torch.stack([totals[n] for n in names]).to(device()) if names else \
            torch.zeros(0, 2, dtype=torch.float64, device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group())
            names_len = torch.tensor([len(names)])
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.broadcast(names_len, src=last, group=pp_group)
                if flat.shape[0] != int(names_len):
                    flat = torch.zeros(int(names_len), 2, dtype=torch.float64, device=device())
                torch.distributed.broadcast(flat, src=last, group=pp_group)
                obj = [names]
                torch.distributed.broadcast_object_list(obj, src=last, group=pp_group)
                names = obj[0]
        metrics = {n: flat[i] for i, n in enumerate(names)}
        loss = metrics.get("loss", torch.tensor([float("nan"), 1.0], dtype=torch.float64))
        return loss, metrics

    def train_step(self, microbatches: list[Batch], objective: Objective) -> StepResult:
        start = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_pair, metrics = self.forward_backward(microbatches, objective)
        loss = float(loss_pair[0] / loss_pair[1].clamp(min=1))
        grad_norm = None
        skipped = not math.isfinite(loss)
        if skipped:
            self._count_nonfinite(f"non-finite loss {loss}")
        else:
            ok, grad_norm, _ = self.optimizer.step()
            if ok:
                self.state.nonfinite_in_a_row = 0
                self.scheduler.step(increment=1)
            else:  # inf/NaN gradients (grad_guard.py, or a grad scaler's check)
                skipped = True
                self._count_nonfinite(f"non-finite gradients (norm {grad_norm})")
        tokens, flops, batch_tokens = self._step_work(microbatches)
        values = {n: float(v[0] / v[1].clamp(min=1)) for n, v in metrics.items()}
        return StepResult(
            step=self.state.step + 1, loss=loss, metrics=values,
            grad_norm=None if grad_norm is None else float(grad_norm), skipped=skipped,
            seconds=time.perf_counter() - start, tokens=tokens, flops=flops, lr=lr, batch_tokens=batch_tokens,
        )

    def _step_work(self, microbatches: list[Batch]) -> tuple[int, float, int]:
        """Non-padding tokens, their model FLOPs and all batch positions of a step, summed over the
        data-parallel ranks: length-bucketed micro-batches differ from rank to rank, and attention's cost
        grows with each document's length (:func:`document_lengths`)."""
        from megatron.core import parallel_state

        model = self.cfg.model
        lengths = [n for b in microbatches for n in document_lengths(b)]
        work = torch.tensor([
            float(sum(lengths)),
            sum(model.flops_per_token(n) * n for n in lengths),
            sum(float(b["tokens"].numel()) for b in microbatches),
        ], dtype=torch.float64, device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(work, group=parallel_state.get_data_parallel_group())
        return int(work[0]), float(work[1]), int(work[2])

    def _count_nonfinite(self, what: str) -> None:
        self.state.nonfinite_in_a_row += 1
        log.warning("step %d: %s, update skipped (%d in a row)", self.state.step, what, self.state.nonfinite_in_a_row)
        if self.state.nonfinite_in_a_row >= self.cfg.trainer.max_nonfinite_in_a_row:
            raise RuntimeError(
                f"{self.state.nonfinite_in_a_row} non-finite steps in a row (trainer.max_nonfinite_in_a_row): {what}")

    # ----------------------------------------------------------------- the loop
    def fit(self, producer: BatchProducer, objective: Objective, on_step=None) -> TrainState:
        """Train until trainer.max_steps, checkpointing on schedule, at the end, and on SIGTERM/SIGUSR1."""
        t = self.cfg.trainer
        steps_this_process = 0
        while self.state.step < t.max_steps:
            microbatches = producer.next_batch(self.state.step)
            result = self.train_step(microbatches, objective)
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            self.state.history.append(result.loss)
            steps_this_process += 1
            self._log(result, extra=on_step(self, result) if on_step else None)
            stop = true_on_any_rank(self.stop.requested)
            periodic = t.save_interval and self.state.step % t.save_interval == 0
            last = self.state.step >= t.max_steps
            early_exit = t.exit_after_steps is not None and steps_this_process >= t.exit_after_steps
            if periodic or last or stop or early_exit:
                self.save(producer)
                # A signal that came during the save stops here too: its checkpoint is on disk, and another
                # step (a rollout, a validation) could outlast Slurm's grace period.
                stop = stop or true_on_any_rank(self.stop.requested)
            if stop and last:
                log.warning("signal after the last step %d: the run is complete (checkpoint saved)", self.state.step)
            elif stop:
                log.warning("stopping on signal after step %d (checkpoint saved)", self.state.step)
                self.logger.close()
                exit_for_requeue(f"checkpoint of step {self.state.step}")
            if early_exit and not last:
                break
        self.logger.close()
        return self.state


    def _log(self, r: StepResult, extra: dict[str, float] | None = None) -> None:
        t = self.cfg.trainer
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tokens_per_s = r.tokens / max(r.seconds, 1e-9)
        tflops_per_device = r.flops / max(r.seconds, 1e-9) / world / 1e12
        values: dict[str, float] = {
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": tokens_per_s,
            "batch_tokens_per_s": r.batch_tokens / max(r.seconds, 1e-9),
            "tflops_per_device": tflops_per_device,
            "skipped": float(r.skipped),
        }
        peak = t.peak_tflops or self.cfg.cluster.peak_tflops_bf16
        if peak:
            values["mfu"] = tflops_per_device / peak
        values.update({k: v for k, v in r.metrics.items() if k != "loss"})
        values.update(extra or {})
        self.logger.scalars(r.step, values, prefix="train/")
        if r.step % t.log_interval == 0 or r.step == t.max_steps:
            self.logger.console(r.step, t.max_steps, {k: values[k] for k in ("loss", "lr", "grad_norm",
                                                                              "tokens_per_s", "tflops_per_device")})

    # ----------------------------------------------------------------- checkpoints
    def _sharded_state(self, producer: BatchProducer | None, loading: bool, with_optimizer: bool = True):
        model_sd = self.unwrapped.sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd}
        if with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata=ckpt.OPTIM_METADATA
            )
            state["scheduler"] = self.scheduler.state_dict()
            state["train_state"] = {
                "step": self.state.step, "consumed_samples": self.state.consumed_samples,
                "history": list(self.state.history), "nonfinite_in_a_row": self.state.nonfinite_in_a_row,
            }
            state["producer"] = producer.state_dict() if producer is not None else {}
        return state

    def save(self, producer: BatchProducer | None = None) -> str:
        rank_state = {
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        }
        from megatron.core import tensor_parallel

        rank_state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        if torch.cuda.is_available():
            rank_state["cuda"] = torch.cuda.get_rng_state()
        if producer is not None and hasattr(producer, "rank_state_dict"):
            rank_state["producer"] = producer.rank_state_dict()  # e.g. GRPO's cached rollout on this rank
        # Before the first step the (distributed) optimizer has no state to save: weights only.
        with_optimizer = self.state.step > 0
        return ckpt.save_checkpoint(
            self.ckpt_root, self.state.step,
            self._sharded_state(producer, loading=False, with_optimizer=with_optimizer), rank_state,
            {**self.metadata, "step": self.state.step, "distributed_optimizer": self.distributed_optimizer,
             "layout": self.layout},
        )

    @property
    def layout(self) -> dict[str, int]:
        """The model-parallel layout a checkpoint records (data parallel follows from the world size)."""
        return {"tensor_parallel": self.cfg.parallel.tensor_parallel,
                "pipeline_parallel": self.cfg.parallel.pipeline_parallel}

    def _load_scheduler(self, saved: dict[str, Any], folder: str) -> None:
        """The checkpoint's step on this run's schedule, which must be the checkpoint's own unless overridden.

        Megatron's scheduler silently keeps the checkpoint's schedule: a run resumed with a larger
        ``trainer.max_steps`` would finish its old decay and train its extra steps at ``min_lr``."""
        differences = schedule_differences(self.scheduler.state_dict(), saved)
        if differences and not self.cfg.optimizer.override_schedule:
            raise ValueError(f"{folder} was trained on another learning-rate schedule than this run's:\n  "
                             + "\n  ".join(differences) + "\nresume with the checkpoint's settings, or set "
                             "optimizer.override_schedule=true to continue from its step on this run's schedule")
        if differences:
            log.warning("optimizer.override_schedule: continuing %s from step %d on this run's schedule (%s)",
                        folder, saved["num_steps"], "; ".join(differences))
            self.scheduler.override_opt_param_scheduler = True
            self.scheduler.use_checkpoint_opt_param_scheduler = False
        self.scheduler.load_state_dict(saved)

    def resume(self, producer: BatchProducer | None = None) -> bool:
        """Continue this run from ``latest`` (model, optimizer, scheduler, data position, RNG)."""
        folder = ckpt.latest_checkpoint(self.ckpt_root)
        if folder is None:
            return False
        if int(ckpt.read_metadata(folder).get("step", 0)) == 0:
            self.load_weights(folder)
            return True
        check_checkpoint_model(folder, self.cfg.model)
        self._materialize_optimizer_state()
        loaded = ckpt.load_checkpoint(folder, self._sharded_state(producer, loading=True))
        self.unwrapped.load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        self._load_scheduler(loaded["scheduler"], folder)
        ts = loaded["train_state"]
        self.state.step, self.state.consumed_samples = int(ts["step"]), int(ts["consumed_samples"])
        self.state.history = list(ts.get("history", []))
        self.state.nonfinite_in_a_row = int(ts.get("nonfinite_in_a_row", 0))  # older checkpoints: not recorded
        self.logger.purge_from(self.state.step + 1)
        if producer is not None:
            producer.load_state_dict(loaded["producer"])
        rank_state = ckpt.load_rank_state(folder, self.layout)
        if rank_state is None:
            log.warning("%s was written by another number of ranks or another tensor/pipeline layout: RNG states "
                        "start afresh and per-rank producer state (GRPO: the remaining updates of the last "
                        "rollout) is not restored", folder)
        else:
            from megatron.core import tensor_parallel

            random.setstate(rank_state["python"])
            np.random.set_state(rank_state["numpy"])
            torch.set_rng_state(rank_state["torch"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rank_state["tracker"])
            if "cuda" in rank_state and torch.cuda.is_available():
                torch.cuda.set_rng_state(rank_state["cuda"])
            if producer is not None and "producer" in rank_state and hasattr(producer, "load_rank_state_dict"):
                producer.load_rank_state_dict(rank_state["producer"])
        log.info("resumed from %s at step %d", folder, self.state.step)
        return True

    def _materialize_optimizer_state(self) -> None:
        """Give a fresh torch Adam its (zero) state so Megatron can build the structure to load into.

        Without apex/TE, DistributedOptimizer.state_dict() reads ``state[p]["step"]`` of every param,
        which torch creates only at the first step; Megatron's own init_state_fn sets no ``step``.
        """
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in optimizers:
            inner = opt.optimizer
            if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                continue  # TE's/apex's FusedAdam: Megatron's init_state_fn builds their state (no "step")
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p.data),
                                          "exp_avg_sq": torch.zeros_like(p.data)}

    def load_weights(self, folder: str) -> None:
        """Start from another run's weights (any TP/PP layout); optimizer and step start fresh. ``folder`` is
        an ``iter_*`` folder, or a run's checkpoints folder, which means its ``latest``."""
        folder = ckpt.checkpoint_folder(folder)
        check_checkpoint_model(folder, self.cfg.model)
        loaded = ckpt.load_checkpoint(folder, {"model": self.unwrapped.sharded_state_dict()})
        self.unwrapped.load_state_dict(loaded["model"])
        # DDP keeps its own main-param copy for the distributed optimizer: refresh it from the model.
        self.optimizer.reload_model_params()
        log.info("loaded weights from %s", folder)


def _dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size() if torch.distributed.is_initialized() else 1


@torch.no_grad()
def forward_logprobs(model: torch.nn.Module, microbatches: list[Batch],
                     loss_tokens_only: bool = True) -> list[torch.Tensor] | None:
    """log p(labels) per position for each micro-batch, through Megatron's schedule (PP-aware, no grads).

    Used for the frozen reference model and for recomputing old-policy log-probabilities. Returns the
    ``[b, s]`` tensors on the last pipeline stage and None elsewhere; with ``loss_tokens_only`` only the
    positions where ``loss_mask`` is non-zero are computed (the rest read 0).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[Batch], m):
        batch = to_device(next(data_iterator))
        output = token_nll_forward(m, batch, loss_tokens_only)

        def keep(out: torch.Tensor):
            collected.append(-out.detach().float())
            return out.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        return output, keep

    was_training = model.training
    model.eval()
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=True,
        )
    finally:
        model.train(was_training)
    if torch.distributed.is_initialized() and not parallel_state.is_pipeline_last_stage():
        return None
    return collected
