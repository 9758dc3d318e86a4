"""bench/rollout.py --responses: rows shaped as the stages' judgment prompts, a shared head and the same
response blocks in a random order per row, so the bench's ours/HF ratio reflects that workload."""

from __future__ import annotations

import sys

import pytest


def _args(bench, monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["rollout.py", *argv])
    return bench.parse_args()


def test_rows_show_one_head_and_the_same_blocks_in_shuffled_orders(bench, monkeypatch):
    args = _args(bench, monkeypatch, "--responses", "3", "--min-prompt", "40", "--max-prompt", "60")
    prompts = bench.make_prompts(args, 4)
    rows = bench.shown_rows(args, prompts, 8)
    assert len(rows) == 32
    orders = set()
    for i, prompt in enumerate(prompts):
        head = len(prompt) - round(len(prompt) * args.response_share)
        mine = rows[8 * i: 8 * (i + 1)]
        assert all(len(row) == len(prompt) and row[:head] == prompt[:head] for row in mine)
        assert all(sorted(row) == sorted(prompt) for row in mine)
        orders |= {tuple(row) for row in mine}
    assert len(orders) > len(prompts)  # the orders differ between rows of one prompt


def test_without_responses_rows_repeat_each_prompt(bench, monkeypatch):
    args = _args(bench, monkeypatch)
    prompts = bench.make_prompts(args, 2)
    assert bench.shown_rows(args, prompts, 3) == [prompts[0]] * 3 + [prompts[1]] * 3


def test_a_share_that_leaves_a_block_empty_is_refused(bench, monkeypatch):
    with pytest.raises(SystemExit):
        _args(bench, monkeypatch, "--responses", "4", "--response-share", "0.04", "--min-prompt", "10")
