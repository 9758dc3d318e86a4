"""GRPO's group-relative advantages (paper §3.2, rule-based online RL), as plain math.

Each example gets G judgments; each judgment's reward is +1 if correct by Eq. 10, else −1. The advantage
of judgment i in its group is (r_i − mean(r)) / std(r) (or, Dr. GRPO style, without the std scaling).
A group whose rewards are all equal carries no signal: its advantages are 0 and it is reported (and may
be filtered out of the update).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: list[float]
    zero_variance_groups: list[int]  # indices of groups whose rewards were all equal


def group_advantages(
    rewards: Sequence[float | None], group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> GroupAdvantages:
    """Advantages for rewards laid out group after group (G consecutive rewards per example).

    ``std`` is the population standard deviation of the group. DeepSeekMath's GRPO says only "std"; TRL
    and verl take torch.std, the sample std, which is sqrt(G/(G-1)) larger (advantages that much smaller:
    a rescaled step, the same direction). ``eps`` keeps a near-constant group from exploding.

    A ``None`` reward is a judgment that was never generated (its prompt left no room): it is no sample of
    the policy, so it stays out of its group's mean and std and gets advantage 0; a group with fewer than
    two generated judgments carries no signal.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    advantages: list[float] = []
    zero_variance: list[int] = []
    for g in range(len(rewards) // group_size):
        group = rewards[g * group_size:(g + 1) * group_size]
        present = [float(r) for r in group if r is not None]
        mean = sum(present) / max(len(present), 1)
        std = math.sqrt(sum((r - mean) ** 2 for r in present) / max(len(present), 1))
        if std == 0.0:
            zero_variance.append(g)
            advantages.extend([0.0] * group_size)
            continue
        scale = std + eps if scale_by_std else 1.0
        advantages.extend(0.0 if r is None else (float(r) - mean) / scale for r in group)
    return GroupAdvantages(advantages, zero_variance)
