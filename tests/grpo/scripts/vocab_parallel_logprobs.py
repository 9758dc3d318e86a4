"""TP ranks (torchrun): log-probabilities, entropy and their gradient from vocab-sharded logits, against
``torch.log_softmax`` on the full logits. Rank 0 writes ``<out>`` (JSON of max abs differences)."""

from __future__ import annotations

import sys

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.report import write_on_rank0


def main(out: str) -> None:
    from megatron.core import parallel_state

    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, dist_env, init_parallel
    from megatron_grm.parallel.vocab import vocab_parallel_logprobs_and_entropy

    tp = dist_env().world_size
    init_parallel(ParallelLayout(tensor_parallel=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(3)
    full = (torch.randn(2, 5, 12, generator=gen) * 3).requires_grad_(True)
    labels = torch.randint(0, 12, (2, 5), generator=gen)
    weights = torch.randn(2, 5, generator=gen)

    expected_lp = torch.log_softmax(full, -1).gather(-1, labels[..., None]).squeeze(-1)
    probs = torch.softmax(full, -1)
    expected_entropy = -(probs * torch.log_softmax(full, -1)).sum(-1)
    (expected_lp * weights).sum().backward()
    expected_grad = full.grad.clone()

    width = 12 // tp
    shard = full.detach()[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(shard, labels)
    (logprobs * weights).sum().backward()
    report = {
        "tp": tp,
        "logprob_max_abs_diff": (logprobs.detach() - expected_lp.detach()).abs().max().item(),
        "entropy_max_abs_diff": (entropy - expected_entropy.detach()).abs().max().item(),
        "grad_max_abs_diff": (shard.grad - expected_grad[..., rank * width:(rank + 1) * width]).abs().max().item(),
        "entropy_mean": entropy.mean().item(),
    }
    write_on_rank0(out, report)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
