"""GRPO's loss, metrics and gradients, the reference/old-policy log-probabilities and the rollout's
``training_logprobs``: the output layer on the loss positions only vs on every position, one model and
one batch under a given layout (torchrun). The last rank writes ``--out`` (JSON of max abs differences).
"""

from __future__ import annotations

import argparse
import json

import torch


def grpo_batches(vocab: int, seq: int, mbs: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches shaped like a GRPO rollout's: a prompt, a judgment, right padding; the last micro-batch
    is all zero-weight padding copies (no loss token at all)."""
    from megatron_grm.data.packing import collate_padded

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(count):
        docs = []
        for _ in range(mbs):
            length = int(torch.randint(seq // 2, seq + 1, (1,), generator=gen))
            prompt = int(torch.randint(2, length - 2, (1,), generator=gen))
            ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
            docs.append((ids, [0] * prompt + [1] * (length - prompt)))
        batch = collate_padded(docs, seq_length=seq)
        if k == count - 1:
            batch["loss_mask"].zero_()
        mask = batch["loss_mask"]
        batch["advantages"] = torch.randn(mbs, 1, generator=gen).expand(-1, seq).contiguous()
        batch["old_logprobs"] = (-3.0 - torch.rand(mbs, seq, generator=gen)) * mask
        batch["ref_logprobs"] = (-3.0 - torch.rand(mbs, seq, generator=gen)) * mask
        batches.append(batch)
    return batches


def _max_over_ranks(value: float) -> float:
    """Every pipeline stage holds gradients of its own layers: compare them all."""
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state

    from megatron_grm.rollout.logprobs import training_logprobs
    from megatron_grm.stages.common import load_config, prepare_run
    from megatron_grm.stages.grpo import GRPOObjective, GRPOSettings
    from megatron_grm.train.loop import Trainer, forward_logprobs
    from tests.train.scripts.probe_train import count_output_layer_rows

    seq, mbs = 32, 2
    run = prepare_run(load_config("sft", [
        "model=tiny", "model.num_layers=4", f"parallel.tensor_parallel={args.tp}",
        f"parallel.pipeline_parallel={args.pp}", f"trainer.micro_batch_size={mbs}", "trainer.global_batch_size=6",
        f"trainer.seq_length={seq}", f"trainer.run_dir={args.run_dir}"]))
    trainer = Trainer(run)
    model = trainer.unwrapped
    vocab = run.model.vocab_size
    batches = grpo_batches(vocab, seq, mbs, count=3, seed=5)
    last_stage = getattr(model, "post_process", False)

    rows = count_output_layer_rows(model) or [0]
    settings = GRPOSettings(beta=0.05, clip_eps=0.2)
    runs = {}
    for only in (True, False):
        rows[0] = 0
        trainer.model.zero_grad_buffer()
        loss, metrics = trainer.forward_backward(batches, GRPOObjective(settings, loss_tokens_only=only))
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        logprobs = forward_logprobs(trainer.model, batches, loss_tokens_only=only)
        runs[only] = {"loss": loss, "metrics": metrics, "grads": grads, "logprobs": logprobs, "rows": rows[0]}
    sel, full = runs[True], runs[False]

    report = {"tp": args.tp, "pp": args.pp, "last_stage": bool(last_stage),
              "loss": float(sel["loss"][0] / sel["loss"][1]),
              "loss_diff": float((sel["loss"] - full["loss"]).abs().max()),
              "metric_names": sorted(sel["metrics"]),
              "metric_diff": max(float((sel["metrics"][n] - full["metrics"][n]).abs().max()) for n in sel["metrics"]),
              "grad_diff": _max_over_ranks(max(float((sel["grads"][n] - full["grads"][n]).abs().max())
                                               for n in sel["grads"])),
              "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in sel["grads"].values()))),
              "output_layer_rows": [sel["rows"], full["rows"]],
              "loss_tokens": float(sum(b["loss_mask"].sum() for b in batches))}
    if last_stage:
        masks = [b["loss_mask"] != 0 for b in batches]
        report["logprob_diff"] = float(torch.cat([(s - f)[m] for s, f, m in
                                                  zip(sel["logprobs"], full["logprobs"], masks)]).abs().max())
        report["logprob_outside_mask"] = float(torch.cat([s[~m] for s, m in zip(sel["logprobs"], masks)]).abs().max())
        report["logprob_mean"] = float(torch.cat([s[m] for s, m in zip(sel["logprobs"], masks)]).mean())
    if args.pp == 1:
        # The rollout engine's check: continuation log-probabilities of sequences of different lengths.
        sequences = [b["tokens"][r, : int(b["loss_mask"][r].nonzero().max()) + 2].tolist()
                     for b in batches[:2] for r in range(mbs)]
        prompts = [int(b["loss_mask"][r].nonzero().min()) + 1 for b in batches[:2] for r in range(mbs)]
        got = training_logprobs(trainer.model, sequences, prompts)
        want = [full["logprobs"][k // mbs][k % mbs, p - 1: len(s) - 1].tolist()
                for k, (s, p) in enumerate(zip(sequences, prompts))]
        report["training_logprobs_diff"] = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
        report["training_logprobs_lengths"] = [[len(g), len(w)] for g, w in zip(got, want)]
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
