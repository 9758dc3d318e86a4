"""Left-padding a wave's prompts: the padding and the masks every attention window gets, and the groups
of similar lengths a long wave's prefill is cut into."""

from __future__ import annotations

import itertools
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


def test_decode_window_sees_the_row_up_to_itself_minus_padding():
    _, key_padding = left_pad([[5, 6, 7], [8]], pad_id=0, total_length=6)
    mask = window_attention_mask(key_padding, 4, 5)  # one query at position 4, keys 0..4
    assert mask.shape == (2, 1, 1, 5)
    assert (~mask[:, 0, 0]).tolist() == [[True] * 5, [False, False, True, True, True]]


def _positions(lengths, groups) -> int:
    return sum(len(g.rows) * (max(lengths) - g.start) for g in groups)


def _fewest_positions(lengths, max_groups: int) -> int:
    """Every way to cut the rows, sorted longest first, into at most max_groups runs."""
    longest = sorted(lengths, reverse=True)
    best = len(lengths) * longest[0]
    for count in range(1, max_groups):
        for cuts in itertools.combinations(range(1, len(lengths)), count):
            bounds = [0, *cuts, len(lengths)]
            best = min(best, sum((j - i) * longest[i] for i, j in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_cover_every_row_once_with_the_fewest_positions(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 400) for _ in range(rng.randint(3, 9))]
    groups = length_groups(lengths, max_groups=3, min_saving=0.0, min_positions=0)
    if groups is None:  # one group is already the best cut
        assert _fewest_positions(lengths, 3) == len(lengths) * max(lengths)
        return
    rows = sorted(int(r) for g in groups for r in g.rows)
    assert rows == list(range(len(lengths)))
    assert 2 <= len(groups) <= 3
    for g in groups:  # a group starts where its longest prompt does, and holds no longer one
        assert g.start == max(lengths) - max(lengths[int(r)] for r in g.rows)
    assert groups[0].start == 0  # the longest prompt's group comes first
    assert _positions(lengths, groups) == _fewest_positions(lengths, 3)


def test_length_groups_are_kept_only_when_they_save_enough():
    even = [1000, 998, 997, 995] * 8  # 0.3% padding: one prefill
    assert length_groups(even, min_positions=0) is None
    spread = [200, 400, 800, 1600] * 8
    groups = length_groups(spread, min_positions=0)
    assert groups is not None and len(groups) == 4
    assert _positions(spread, groups) == sum(spread)  # each length in a group of its own: no padding left
    assert length_groups(spread, min_positions=32 * 1600 + 1) is None  # a short wave: one prefill
    assert length_groups(spread, min_saving=0.6, min_positions=0) is None  # saves 53%, asked for 60%
    assert length_groups([5], min_positions=0) is None
    with pytest.raises(ValueError, match="max_groups"):
        length_groups(spread, max_groups=0)
