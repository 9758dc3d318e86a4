"""Log-probabilities and entropy over a tensor-parallel (vocab-sharded) output layer.

Each TP rank holds logits for a slice of the vocabulary; the full softmax needs three all-reduces over
the TP group (max, sum of exponentials, and the label's logit). This keeps the policy's numbers exact
under any TP size without gathering the full ``[batch, seq, vocab]`` logits.
"""

from __future__ import annotations

import torch


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` ``[b, s, v/TP]`` (this rank's slice), ``labels`` ``[b, s]`` → logprob of each label and the
    entropy of each position's distribution (both ``[b, s]``, fp32). Differentiable."""
    from megatron.core import tensor_parallel

    logits = logits.float()
    entropy = _vocab_parallel_entropy(logits) if with_entropy else None
    # Megatron's fused vocab-parallel cross-entropy gives −log p(label) exactly and is differentiable. It
    # overwrites its input with the softmax to save memory, so the entropy above must be taken first.
    logprobs = -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    return logprobs, entropy


@torch.no_grad()
def _vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = log Z − E[x] per position, with x the logits shifted by their (global) max; reads ``logits`` only."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group() if torch.distributed.is_initialized() else None
    sharded = group is not None and torch.distributed.get_world_size(group) > 1
    local_max = logits.max(dim=-1, keepdim=True).values
    if sharded:
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - local_max
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    sum_exp_logit = (exp * shifted).sum(dim=-1, keepdim=True)
    if sharded:
        torch.distributed.all_reduce(sum_exp, group=group)
        torch.distributed.all_reduce(sum_exp_logit, group=group)
    return (sum_exp.log() - sum_exp_logit / sum_exp).squeeze(-1)
