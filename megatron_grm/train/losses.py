"""Loss functions as plain math on per-token log-probabilities.

Each returns ``(numerator, denominator, metrics)``: the trainer sums numerators and denominators over
micro-batches and data-parallel ranks before dividing, so the loss (and its gradient) is the same for
any split of the global batch into micro-batches, DP ranks or pipeline stages. ``metrics`` maps a name
to a ``[sum, count]`` pair that is reduced the same way.
"""

from __future__ import annotations

import torch

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def masked_token_nll(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossOutput:
    """Cross-entropy on the masked (response) tokens only, averaged over all such tokens in the batch."""
    mask = loss_mask.float()
    nll_sum = -(token_logprobs.float() * mask).sum()
    count = mask.sum().to(torch.int)  # Megatron accumulates the denominator in an int tensor
    return nll_sum, count, {"loss": torch.stack([nll_sum.detach(), count.detach().to(nll_sum.dtype)])}
