"""Loss functions as plain math on per-token log-probabilities.

Each returns ``(numerator, denominator, metrics)``: the trainer sums numerators and denominators over
micro-batches and data-parallel ranks before dividing, so the loss (and its gradient) is the same for
any split of the global batch into micro-batches, DP ranks or pipeline stages. ``metrics`` maps a name
to a ``[sum, count]`` pair that is reduced the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def masked_token_nll(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossOutput:
    """Cross-entropy on the masked (response) tokens only, averaged over all such tokens in the batch."""
    mask = loss_mask.float()
    nll_sum = -(token_logprobs.float() * mask).sum()
    count = mask.sum().to(torch.int)  # Megatron accumulates the denominator in an int tensor
    return nll_sum, count, {"loss": torch.stack([nll_sum.detach(), count.detach().to(nll_sum.dtype)])}


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from log-probabilities of tokens sampled by the policy.

    With ``log_ratio = ref − policy``: k1 = −log_ratio, k2 = ½ log_ratio², k3 = exp(log_ratio) − log_ratio − 1
    (Schulman's unbiased, always non-negative estimator that GRPO uses). As a *loss* term on sampled tokens
    (the sampling itself is not differentiated) their expected gradients differ from their values: k1's is
    zero (E_π[∇log π] = 0: it adds noise, no pull to the reference), k2's is ∇KL(π ‖ ref), k3's is
    ∇KL(ref ‖ π) (tests/grpo/test_grpo_math.py computes these exactly on a small vocabulary).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"grpo.kl_estimator={estimator!r}; choose one of {KL_ESTIMATORS}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.08,
    kl_estimator: str = "k3",
    aggregation: str = "sequence",
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss plus β·KL to the reference, for sequences of sampled tokens.

    All tensors are ``[batch, seq]`` aligned with the sampled (label) positions; ``advantages`` is one
    value per sequence broadcast over its tokens; ``mask`` is 1 on the judgment's tokens. ``aggregation``:
    "sequence" averages over tokens within each sequence then over sequences (the paper, GRPO), "token"
    averages over all tokens of the batch. Returns ``(numerator, denominator, metrics)``.
    """
    if aggregation not in ("sequence", "token"):
        raise ValueError(f"grpo.aggregation={aggregation!r}; choose 'sequence' or 'token'")
    mask = mask.float()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    pg = -torch.minimum(unclipped, clipped)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    per_token = pg + beta * kl
    clipped_tokens = (unclipped != torch.minimum(unclipped, clipped)).float()

    tokens_per_seq = mask.sum(dim=1)
    has_tokens = (tokens_per_seq > 0).float()
    if aggregation == "sequence":
        def reduce(x: torch.Tensor) -> torch.Tensor:
            return ((x * mask).sum(dim=1) / tokens_per_seq.clamp(min=1.0) * has_tokens).sum()

        count = has_tokens.sum()
    else:
        def reduce(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum()

        count = mask.sum()
    numerator = reduce(per_token)
    denominator = count.to(torch.int)
    c = count.detach().to(numerator.dtype)
    metrics = {
        "loss": torch.stack([numerator.detach(), c]),
        "pg_loss": torch.stack([reduce(pg).detach(), c]),
        "kl": torch.stack([reduce(kl).detach(), c]),
        "clip_fraction": torch.stack([reduce(clipped_tokens).detach(), c]),
        "ratio": torch.stack([reduce(ratio).detach(), c]),
    }
    if entropy is not None:
        metrics["entropy"] = torch.stack([reduce(entropy.float()).detach(), c])
    return numerator, denominator, metrics


def binary_cross_entropy(logits: torch.Tensor, correct: torch.Tensor) -> LossOutput:
    """BCE of the MetaRM logit against the Eq. 10 label (paper §4.2), summed over sequences; the trainer
    divides by the global number of sequences. Also reports accuracy at threshold 0.5."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), correct.float(), reduction="none")
    total = losses.sum()
    count = torch.tensor(logits.numel(), dtype=torch.int)
    hits = ((logits.detach() > 0) == (correct > 0.5)).float().sum()
    n = count.to(total.dtype)
    return total, count, {"loss": torch.stack([total.detach(), n]), "accuracy": torch.stack([hits, n])}
