"""The bookkeeping behind prefilling identical prompts once (rollout/shared_prefill.py); the engine-level
check (same tokens and log-probabilities, fewer prefill rows) is test_identical_prompts_are_prefilled_once."""

import torch

from megatron_grm.rollout.shared_prefill import expand_cache, identical_rows, select_rows


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
