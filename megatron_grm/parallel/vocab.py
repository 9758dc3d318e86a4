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
    from megatron.core import parallel_state, tensor_parallel

    logits = logits.float()
    # Megatron's fused vocab-parallel cross-entropy gives −log p(label) exactly and is differentiable.
    logprobs = -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    if not with_entropy:
        return logprobs, None
    group = parallel_state.get_tensor_model_parallel_group() if torch.distributed.is_initialized() else None
    with torch.no_grad():
        local_max = logits.max(dim=-1, keepdim=True).values
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - local_max
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        sum_exp_logit = (exp * shifted).sum(dim=-1, keepdim=True)
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(sum_exp, group=group)
            torch.distributed.all_reduce(sum_exp_logit, group=group)
        # H = log Z − E[x] with x the shifted logits.
        entropy = (sum_exp.log() - sum_exp_logit / sum_exp).squeeze(-1)
    return logprobs, entropy
