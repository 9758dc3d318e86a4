"""The bookkeeping behind prefilling identical prompts once (rollout/shared_prefill.py); the engine-level
check (same tokens and log-probabilities, fewer prefill rows) is test_identical_prompts_are_prefilled_once."""

import pytest
import torch

from megatron_grm.rollout.shared_prefill import (
    expand_cache,
    identical_prompts,
    identical_rows,
    select_rows,
    shared_segments,
)


def test_identical_rows_maps_every_row_to_its_first_occurrence():
    first, source = identical_rows([[5, 6], [7], [5, 6], [7], [8, 9], [5, 6]])
    assert first.tolist() == [0, 1, 4]
    assert source.tolist() == [0, 1, 0, 1, 2, 0]


def test_distinct_prompts_share_nothing():
    assert identical_rows([[1, 2], [2, 1], [1, 2, 3]]) is None
    assert identical_rows([[4]]) is None


def test_select_rows_keeps_a_mask_shared_by_all_rows():
    first = torch.tensor([0, 2])
    batch = {"tokens": torch.arange(12).view(4, 3), "attention_mask": torch.zeros(1, 1, 3, 3, dtype=torch.bool),
             "row_mask": torch.arange(4).view(4, 1, 1, 1)}
    picked = select_rows(batch, first)
    assert picked["tokens"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert picked["attention_mask"] is batch["attention_mask"]
    assert picked["row_mask"].flatten().tolist() == [0, 2]


def test_expand_cache_gives_each_row_its_prompts_keys_and_values():
    keys = torch.randn(5, 2, 3, 4)  # [positions, distinct rows, heads, dim]
    values = torch.randn(5, 2, 3, 4)
    cache = expand_cache({1: (keys, values)}, torch.tensor([1, 0, 1]))
    k, v = cache[1]
    assert k.shape == (5, 3, 3, 4)
    assert torch.equal(k[:, 0], keys[:, 1]) and torch.equal(k[:, 1], keys[:, 0]) and torch.equal(k[:, 2], keys[:, 1])
    assert torch.equal(v[:, 2], values[:, 1])
    k[:, 0] += 1  # rows are copies, not views of one another
    assert not torch.equal(k[:, 0], k[:, 2])


def _orders(head: list[int], blocks: list[list[int]], orders: list[tuple[int, ...]]) -> list[list[int]]:
    return [head + [t for i in order for t in blocks[i]] for order in orders]


def test_shared_segments_cut_where_an_examples_shuffled_prompts_part():
    """Three 150-token responses after a 200-token head, in four orders (two open alike), and a second
    example of another length: a segment for the head, one while the orders that open alike agree, and
    the rest grouped by identical prompts."""
    blocks = [[10 + i] * 150 for i in range(3)]
    rows = _orders([1] * 200, blocks, [(0, 1, 2), (0, 2, 1), (1, 0, 2), (0, 1, 2)])
    rows += _orders([2] * 100, blocks[:2], [(0, 1), (1, 0)])  # 400 tokens: padded by 250
    segments = shared_segments(rows, min_segment=100)
    assert [(s.start, s.end) for s in segments] == [(0, 200), (200, 350), (350, 650)]
    assert [s.source.tolist() for s in segments] == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 2, 2],
                                                     [0, 1, 2, 0, 3, 4]]
    for segment in segments:  # each group's first row is a row of that group
        assert segment.source[segment.first].tolist() == list(range(len(segment.first)))


def test_shared_segments_keep_the_cuts_that_save_the_most():
    blocks = [[10 + i] * 150 for i in range(3)]
    rows = _orders([1] * 200, blocks, [(0, 1, 2), (0, 2, 1), (1, 0, 2), (0, 1, 2)])
    assert [(s.start, s.end) for s in shared_segments(rows, min_segment=200)] == [(0, 200), (200, 650)]
    two = shared_segments(rows, min_segment=100, max_segments=2)
    assert [(s.start, s.end) for s in two] == [(0, 200), (200, 650)]  # the head saves 3 x 200, the next 1 x 150


def test_shared_segments_none_when_nothing_is_shared_and_identical_prompts_alone():
    assert shared_segments([[1] * 300, [2] * 300], min_segment=100) is None
    only = shared_segments([[1] * 300, [2] * 300, [1] * 300], min_segment=100)
    assert [(s.start, s.end, s.source.tolist()) for s in only] == [(0, 300, [0, 1, 0])]
    assert [(s.start, s.end, s.source.tolist()) for s in identical_prompts([[5, 6], [7, 8], [5, 6]])] == \
        [(0, 2, [0, 1, 0])]
    assert identical_prompts([[5, 6], [7, 8]]) is None


def test_prompts_of_one_length_that_share_only_padding_are_not_cut():
    """Distinct prompts, two of each length: the rows of one length agree only on their left padding, which
    is no work saved; a cut there would prefill the rest through the cache-continuing kernels."""
    rows = [[7] * 300, [8] * 300, [1] * 500, [2] * 500, [3] * 500]
    assert shared_segments(rows, min_segment=100) is None
    rows.append([7] * 120 + [9] * 180)  # shares 120 real tokens with the first row: worth a segment
    assert [(s.start, s.end) for s in shared_segments(rows, min_segment=100)] == [(0, 320), (320, 500)]


def test_shared_segments_group_by_padding_and_refuse_one_position_segments():
    """Rows of other lengths group apart even where both are padding or their tokens match the pad id."""
    rows = [[0] * 5 + [1] * 300, [0] * 5 + [1] * 300, [1] * 300, [1] * 300]  # 0 is also the pad id
    segments = shared_segments(rows, min_segment=100)
    assert [s.source.tolist() for s in segments] == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="min_segment"):
        shared_segments(rows, min_segment=1)
