"""Per-token log-probabilities of given continuations, computed exactly the way training computes them.

``-model(tokens, position_ids, attention_mask, labels=labels)`` is Megatron's vocab-parallel cross
entropy, the per-token log-likelihood the SFT / GRPO losses are built from (``train/loop.py``). Used to
check the rollout engine's reported log-probabilities (``debug_logprobs``) and wherever a stage needs the
log-probabilities of sequences it did not just sample (reference model, old policy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_grm.parallel.loss_positions import LossPositions, output_at


def causal_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's convention: bool [1, 1, s, s], True = masked out. Right padding needs nothing more:
    a real token never attends to positions after it."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)


@torch.no_grad()
def training_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    max_tokens_per_batch: int = 16384,
    pad_id: int = 0,
) -> list[list[float]]:
    """log p(seq[t] | seq[:t]) for every t >= prompt_length of each sequence (the continuation).

    Collective over the tensor-parallel group (all TP ranks must pass the same sequences); needs
    pipeline_parallel = 1 (the forward is one call, not a pipeline schedule).
    """
    from megatron.core import parallel_state

    if torch.distributed.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("training_logprobs needs pipeline_parallel=1")
    if len(sequences) != len(prompt_lengths):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    start = 0
    while start < len(order):
        width = len(sequences[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * max(width, len(sequences[order[end]])) <= max_tokens_per_batch:
            width = max(width, len(sequences[order[end]]))
            end += 1
        chunk = order[start:end]
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            tokens[row, : len(seq)] = seq
            labels[row, : len(seq) - 1] = seq[1:]
        reads = torch.zeros(len(chunk), width)
        for row, i in enumerate(chunk):
            reads[row, prompt_lengths[i] - 1 : len(sequences[i]) - 1] = 1.0
        at = LossPositions(reads.to(device))  # the output layer projects only the continuation's positions
        positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(chunk), width)
        with output_at(model, at):
            logp = -model(tokens.to(device), positions.to(device), causal_mask(width, device),
                          labels=at.gather(labels.to(device)))
        logp = at.scatter(logp).float().cpu()
        for row, i in enumerate(chunk):
            p, n = prompt_lengths[i], len(sequences[i])
            out[i] = logp[row, p - 1 : n - 1].tolist()
        start = end
    return out
