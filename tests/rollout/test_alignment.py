"""Left-padding a wave's prompts: the padding and the masks every attention window gets, and the groups
of similar lengths a long wave's prefill is cut into."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from megatron_grm.rollout.alignment import left_pad, length_groups, window_attention_mask


def test_left_pad_aligns_prompts_at_the_right_and_marks_the_padding():
    padded, key_padding = left_pad([[5, 6, 7], [8], [9, 9]], pad_id=0, total_length=6)
    assert padded == [[5, 6, 7], [0, 0, 8], [0, 9, 9]]
    assert key_padding.tolist() == [[False] * 6, [True, True] + [False] * 4, [True] + [False] * 5]


def test_prefill_mask_is_causal_and_hides_padding_from_every_other_query():
    _, key_padding = left_pad([[5, 6, 7, 8], [9, 9]], pad_id=0, total_length=6)
    mask = window_attention_mask(key_padding, 0, 4)  # True = masked out
    assert mask.shape == (2, 1, 4, 4)
    allowed = ~mask[:, 0]
    assert allowed[0].equal(torch.ones(4, 4, dtype=torch.bool).tril())  # unpadded row: plain causal
    # Row 1 = [pad, pad, 9, 9]: real queries see only real keys up to themselves; a pad query only itself.
    assert allowed[1].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    assert bool(allowed.any(dim=-1).all())  # no empty softmax row


def test_a_prefill_mask_carries_the_padding_counts_its_pattern_holds():
    """mask_plan trusts the counts a prefill mask carries instead of rebuilding the [b, s, s] pattern, so they
    must be what left_padding_of_causal reads off the pattern, for every mix of lengths (empty rows too)."""
    from megatron_grm.models.sdpa_attention import LEFT_PADS_ATTRIBUTE, left_padding_of_causal

    g = torch.Generator().manual_seed(0)
    for width in (1, 2, 7, 16):
        for _ in range(6):
            lengths = torch.randint(0, width + 1, (4,), generator=g).tolist()
            _, key_padding = left_pad([[1] * n for n in lengths], pad_id=0, total_length=width + 3)
            mask = window_attention_mask(key_padding, 0, width)
            declared = getattr(mask, LEFT_PADS_ATTRIBUTE)
            assert declared == left_padding_of_causal(mask), (lengths, declared)
    _, key_padding = left_pad([[5, 6, 7], [8]], pad_id=0, total_length=6)
    assert not hasattr(window_attention_mask(key_padding, 2, 5), LEFT_PADS_ATTRIBUTE)  # queries after a cache
    inner = torch.tensor([[False, True, False, False]])  # padding inside the row, not leading it
    assert not hasattr(window_attention_mask(inner, 0, 4), LEFT_PADS_ATTRIBUTE)


def test_decode_window_sees_the_row_up_to_itself_minus_padding():
    _, key_padding = left_pad([[5, 6, 7], [8]], pad_id=0, total_length=6)
    mask = window_attention_mask(key_padding, 4, 5)  # one query at position 4, keys 0..4
    assert mask.shape == (2, 1, 1, 5)
    assert (~mask[:, 0, 0]).tolist() == [[True] * 5, [False, False, True, True, True]]


def _positions(lengths, groups) -> int:
    return sum(len(g.rows) * (max(lengths) - g.start) for g in groups)


def _least_cost(lengths, max_groups: int, cost: float = 0.0) -> float:
    """Every way to cut the rows, sorted longest first, into at most max_groups runs, each run costing its
    positions plus ``cost``."""
    longest = sorted(lengths, reverse=True)
    best = len(lengths) * longest[0] + cost
    for count in range(1, max_groups):
        for cuts in itertools.combinations(range(1, len(lengths)), count):
            bounds = [0, *cuts, len(lengths)]
            best = min(best, sum((j - i) * longest[i] + cost for i, j in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_length_groups_cover_every_row_once_at_the_least_cost(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 400) for _ in range(rng.randint(3, 9))]
    cost = (0.0, 150.0)[seed % 2]  # a forward's fixed cost, in positions
    groups = length_groups(lengths, max_groups=3, min_saving=0.0, cost=cost)
    if groups is None:  # one group is already the best cut
        assert _least_cost(lengths, 3, cost) == len(lengths) * max(lengths) + cost
        return
    rows = sorted(int(r) for g in groups for r in g.rows)
    assert rows == list(range(len(lengths)))
    assert 2 <= len(groups) <= 3
    for g in groups:  # a group starts where its longest prompt does, and holds no longer one
        assert g.start == max(lengths) - max(lengths[int(r)] for r in g.rows)
    assert groups[0].start == 0  # the longest prompt's group comes first
    assert _positions(lengths, groups) + len(groups) * cost == _least_cost(lengths, 3, cost)


def test_length_groups_are_kept_only_when_they_save_enough():
    even = [1000, 998, 997, 995] * 8  # 0.3% padding: one prefill
    assert length_groups(even) is None
    spread = [200, 400, 800, 1600] * 8
    groups = length_groups(spread)
    assert groups is not None and len(groups) == 4
    assert _positions(spread, groups) == sum(spread)  # each length in a group of its own: no padding left
    # Each group's forward costs positions too: 3 groups cover 8 x 200 more than 4 (the 200s padded to
    # 400); when a forward costs more than that, they share one.
    assert len(length_groups(spread, cost=8 * 200 - 1)) == 4
    assert len(length_groups(spread, cost=8 * 200 + 1)) == 3
    assert length_groups(spread, cost=32 * 1600) is None  # a forward dearer than all the padding: one prefill
    assert length_groups(spread, cost=math.inf) is None
    assert length_groups(spread, min_saving=0.6) is None  # saves 53%, asked for 60%
    assert length_groups([5]) is None
    with pytest.raises(ValueError, match="max_groups"):
        length_groups(spread, max_groups=0)
