"""A progress bar for long generations: rank 0 only, shown only when a call takes more than a moment."""

from __future__ import annotations

import time

import torch


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class RolloutProgress:
    """Samples finished out of the total, with generated tokens per second; silent off rank 0."""

    def __init__(self, total_samples: int, enabled: bool = True, delay_s: float = 2.0) -> None:
        from tqdm import tqdm

        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_samples, desc="rollout", unit="sample", delay=delay_s,
                        disable=not (enabled and _is_rank0()), leave=False, dynamic_ncols=True)

    def step(self, new_tokens: int, finished: int) -> None:
        """One decoding step: ``new_tokens`` tokens were generated and ``finished`` samples ended."""
        self.tokens += new_tokens
        if finished:
            self.bar.update(finished)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
