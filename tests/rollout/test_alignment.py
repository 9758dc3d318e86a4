"""Left-padding a wave's prompts: the padding and the masks every attention window gets."""

from __future__ import annotations

import torch

from megatron_grm.rollout.alignment import left_pad, window_attention_mask


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
