"""Train the tiny model for a few steps under a given layout and report losses, grad norms and weights.

Used by tests/train/test_parallel_equivalence.py and test_checkpointing.py through torchrun.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def synthetic_samples(n: int, seq: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        length = int(rng.integers(seq // 2, seq + 1))
        ids = rng.integers(3, vocab, size=length).tolist()
        prompt = int(rng.integers(1, length - 1))
        samples.append((ids, [0] * prompt + [1] * (length - prompt)))
    return samples


def count_output_layer_rows(model) -> list[int]:
    """Positions the output layer projected onto the vocabulary, summed over all forwards (empty list on a
    pipeline stage without the output layer)."""
    layer = getattr(model, "output_layer", None) if getattr(model, "post_process", False) else None
    if layer is None:
        return []
    rows = [0]

    def count(module, args, output):
        logits = output[0]
        rows[0] += logits.shape[0] * logits.shape[1]

    layer.register_forward_hook(count)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--init", default=None, help="checkpoint folder to load weights from")
    ap.add_argument("--save-init", action="store_true", help="save step-0 weights and exit")
    ap.add_argument("--exit-after", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dist-opt", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-only", action="store_true", help="report the loss of the first batch, no step")
    ap.add_argument("--eval-around", action="store_true",
                    help="also report the first batch's loss before and after training (eval_before, eval_after)")
    ap.add_argument("--save-interval", type=int, default=0)
    ap.add_argument("--hang-in-save-of", type=int, default=None,
                    help="block inside the save of this step, after the files are written (kill test)")
    ap.add_argument("--signal-in-save-of", type=int, default=None,
                    help="send this process SIGUSR1 right after the checkpoint of this step is written")
    ap.add_argument("--nan-at", default="", help="comma-separated steps whose loss is made NaN")
    ap.add_argument("--nan-grad-at", default="", help="comma-separated steps with a finite loss and NaN gradients")
    ap.add_argument("--wgrad-fusion", type=int, default=1, help="0: weight gradients through .grad and DDP's hook")
    ap.add_argument("--tied", action="store_true", help="tie the output layer to the embedding")
    ap.add_argument("--fused-adam", type=int, default=1, help="0: Megatron's torch AdamW as built (foreach)")
    ap.add_argument("--loss-tokens-only", type=int, default=1, help="0: the output layer projects every position")
    ap.add_argument("--precision", default="fp32", help="conf/precision choice: fp32 or bf16")
    ap.add_argument("--set", action="append", default=[], help="a further config override, key=value")
    ap.add_argument("--lazy-grad-zeroing", type=int, default=1, help="0: Megatron zeroes the whole grad buffer")
    args = ap.parse_args()

    from megatron_grm.parallel.fused_adam import inner_torch_optimizers
    from megatron_grm.stages.common import load_config, prepare_run
    from megatron_grm.stages.sft import SupervisedObjective
    from megatron_grm.train.loop import Trainer
    from megatron_grm.train.producers import SampleBatchProducer

    overrides = [
        "model=tiny", f"parallel.tensor_parallel={args.tp}", f"parallel.pipeline_parallel={args.pp}",
        f"trainer.micro_batch_size={args.mbs}", f"trainer.global_batch_size={args.gbs}",
        f"trainer.max_steps={args.steps}", "trainer.seq_length=32", f"trainer.run_dir={args.run_dir}",
        f"optimizer.use_distributed_optimizer={bool(args.dist_opt)}", "optimizer.warmup_steps=0",
        "model.num_layers=4", f"precision={args.precision}",
    ]
    if not args.fused_adam:
        overrides.append("optimizer.fused_kernel=false")
    if not args.loss_tokens_only:
        overrides.append("trainer.loss_tokens_only=false")
    if args.tied:
        overrides.append("model.tie_word_embeddings=true")
    if not args.lazy_grad_zeroing:
        overrides.append("trainer.lazy_grad_zeroing=false")
    if args.save_interval:
        overrides.append(f"trainer.save_interval={args.save_interval}")
    if args.exit_after:
        overrides.append(f"trainer.exit_after_steps={args.exit_after}")
    run = prepare_run(load_config("sft", overrides + args.set))
    model = None
    if not args.wgrad_fusion:
        from megatron_grm.models.provider import build_model

        model = build_model(run.model, run.parallel, run.precision, run.trainer.recompute, wgrad_fusion=False)
    trainer = Trainer(run, model=model)
    samples = synthetic_samples(64, 32, 256, seed=7)
    producer = SampleBatchProducer(samples, args.gbs, args.mbs, 32, pad_id=0, seed=11)
    if args.init:
        trainer.load_weights(args.init)

    def first_batch_loss() -> float:  # of a fresh producer's first batch, as --eval-only reports
        batch = SampleBatchProducer(samples, args.gbs, args.mbs, 32, pad_id=0, seed=11).next_batch(0)
        loss, _ = trainer.forward_backward(batch, SupervisedObjective(), forward_only=True)
        return float(loss[0] / loss[1])

    if args.resume:
        try:
            assert trainer.resume(producer), "no checkpoint to resume from"
        except ValueError as err:
            with open(args.out, "w") as f:
                json.dump({"resume_error": str(err)}, f)
            from megatron_grm.parallel import destroy_parallel

            destroy_parallel()
            return
    lr_at_start = trainer.scheduler.get_lr(trainer.optimizer.param_groups[0])
    if args.save_init:
        trainer.save(producer)
        result = {"saved": True}
    elif args.eval_only:
        result = {"loss": first_batch_loss(), "lr_at_start": lr_at_start}
    else:
        if args.hang_in_save_of is not None:
            import megatron.core.dist_checkpointing as dc

            real_save = dc.save

            def hanging_save(state, folder, *a, **k):
                out = real_save(state, folder, *a, **k)
                if f"iter_{args.hang_in_save_of:07d}" in str(folder):
                    marker = os.path.join(args.run_dir, "in_save")
                    with open(marker + ".tmp", "w") as f:
                        f.write(f"{os.getpid()}\n{folder}")  # the test kills this worker by pid
                    os.replace(marker + ".tmp", marker)
                    import time

                    time.sleep(600)  # the test kills us here
                return out

            dc.save = hanging_save
        if args.signal_in_save_of is not None:  # as Slurm's time-limit warning arriving during that save
            import signal

            real_save_checkpoint = trainer.save

            def signalled_save(producer=None):
                folder = real_save_checkpoint(producer)
                if trainer.state.step == args.signal_in_save_of:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return folder

            trainer.save = signalled_save
        grad_norms: list[float] = []
        losses: list[float] = []

        skipped: list[bool] = []
        param_sums: list[float] = []  # after each step: a skipped update leaves it as it was

        def record(tr, r):
            losses.append(r.loss)
            grad_norms.append(r.grad_norm)
            skipped.append(r.skipped)
            param_sums.append(sum(p.detach().double().sum().item() for p in trainer.unwrapped.parameters()))
            return {}

        producer_log: list = []
        next_batch = producer.next_batch

        def logged_next_batch(step):
            batches = next_batch(step)
            producer_log.extend(batches)
            return batches

        producer.next_batch = logged_next_batch
        objective = SupervisedObjective(run.trainer.loss_tokens_only)
        output_rows = count_output_layer_rows(trainer.unwrapped)
        nan_steps = {int(x) for x in args.nan_at.split(",") if x}
        nan_grad_steps = {int(x) for x in args.nan_grad_at.split(",") if x}
        if nan_steps or nan_grad_steps:
            class PoisonedObjective(SupervisedObjective):
                def loss(self, output, batch):
                    num, den, metrics = super().loss(output, batch)
                    if trainer.state.step + 1 in nan_steps:
                        num = num * float("nan")
                        metrics = {"loss": metrics["loss"] * float("nan")}
                    if trainer.state.step + 1 in nan_grad_steps:  # adds 0, differentiates to 0 * inf = NaN
                        num = num + (output - output.detach()).abs().sqrt().sum()
                    return num, den, metrics

            objective = PoisonedObjective(run.trainer.loss_tokens_only)
        eval_before = first_batch_loss() if args.eval_around else None
        try:
            trainer.fit(producer, objective, on_step=record)
        except RuntimeError as err:
            result_error = str(err)
        else:
            result_error = None
        embedding = getattr(trainer.unwrapped, "embedding", None)  # on the first pipeline stage
        result = {"lr_at_start": lr_at_start, "losses": losses, "grad_norms": grad_norms, "skipped": skipped,
                  "param_sums": param_sums,
                  "history": trainer.state.history,
                  "step": trainer.state.step, "error": result_error,
                  "eval_before": eval_before, "eval_after": first_batch_loss() if args.eval_around else None,
                  "wgrad_fusion": trainer.config.gradient_accumulation_fusion,
                  "overwritten_weights": len(trainer.grad_zeroing.weights),
                  "output_layer_rows": output_rows[0] if output_rows else None,
                  "loss_tokens": float(sum(b["loss_mask"].sum() for b in producer_log)),
                  "fused_adam": [group["fused"] for opt in inner_torch_optimizers(trainer.optimizer)
                                 for group in opt.param_groups],
                  # Set by a backward that accumulated into main_grad itself: the fused GEMMs, the embedding lookup.
                  "weights_accumulated_in_main_grad": sum(bool(getattr(p, "grad_added_to_main_grad", False))
                                                          for p in trainer.unwrapped.parameters()),
                  "embedding_in_main_grad": embedding is not None and bool(
                      getattr(embedding.word_embeddings.weight, "grad_added_to_main_grad", False))}
    # Full weights, gathered in a layout-independent way: the checksum of each tensor shard by name.
    rank = torch.distributed.get_rank()
    weights = {k: v.detach().double().sum().item() for k, v in trainer.unwrapped.state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    torch.save({k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()
                if isinstance(v, torch.Tensor)}, f"{args.out}.rank{rank}.pt")
    result["weight_sums"] = weights
    if rank == torch.distributed.get_world_size() - 1:
        with open(args.out, "w") as f:
            json.dump(result, f)
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
