"""Sample order is deterministic, disjoint across DP ranks, resumable; blends follow their weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from megatron_grm.data.blend import BlendedDataset
from megatron_grm.data.packing import PaddedBatcher
from megatron_grm.data.preprocess import PreprocessConfig, PreprocessedDataset, preprocess
from megatron_grm.data.sampler import ResumableSampler


def draw(sampler: ResumableSampler, n: int) -> list[int]:
    return list(itertools.islice(sampler, n))


def test_ranks_partition_every_epoch():
    n, dp = 10, 3
    samplers = [ResumableSampler(n, dp_rank=r, dp_size=dp, seed=7) for r in range(dp)]
    first_epoch = [draw(s, len(range(r, n, dp))) for r, s in enumerate(samplers)]
    flat = [i for share in first_epoch for i in share]
    assert sorted(flat) == list(range(n)), "each sample exactly once per epoch across ranks"
    second_epoch = [draw(s, len(range((r - n) % dp, n, dp))) for r, s in enumerate(samplers)]
    assert sorted(i for share in second_epoch for i in share) == list(range(n))
    assert first_epoch != second_epoch, "a new permutation each epoch"


def test_same_seed_same_order_and_other_seed_other_order():
    assert draw(ResumableSampler(100, seed=1), 250) == draw(ResumableSampler(100, seed=1), 250)
    assert draw(ResumableSampler(100, seed=1), 100) != draw(ResumableSampler(100, seed=2), 100)
    assert draw(ResumableSampler(5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]
    assert draw(ResumableSampler(5, num_epochs=1), 9) == draw(ResumableSampler(5), 5), "stops after one epoch"


def test_resume_from_state_dict_continues_the_same_stream():
    reference = ResumableSampler(37, dp_rank=1, dp_size=4, seed=3)
    expected = draw(reference, 60)
    sampler = ResumableSampler(37, dp_rank=1, dp_size=4, seed=3)
    draw(sampler, 25)
    state = sampler.state_dict()
    restored = ResumableSampler(37, dp_rank=1, dp_size=4, seed=3)
    restored.load_state_dict(state)
    assert draw(restored, 35) == expected[25:]
    assert sampler.state_dict(rewind=1)["position"] == 24


def test_consumed_samples_carry_over_to_another_dp_size():
    """Megatron's global counter: after 24 samples at DP=2, DP=3 continues the same global stream."""
    single = draw(ResumableSampler(50, seed=9), 60)
    old = [ResumableSampler(50, dp_rank=r, dp_size=2, seed=9) for r in range(2)]
    for s in old:
        draw(s, 12)
    state = old[0].state_dict()
    assert state["consumed_samples"] == 24
    new = [ResumableSampler(50, dp_rank=r, dp_size=3, seed=9) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    interleaved = [i for group in zip(*(draw(s, 12) for s in new)) for i in group]
    assert interleaved == single[24:60]
    assert draw(ResumableSampler(50, dp_rank=2, dp_size=3, seed=9, consumed_samples=24), 3) == single[26:35:3]
    with pytest.raises(ValueError, match="multiple of dp_size=4"):
        ResumableSampler(50, dp_size=4, consumed_samples=6)


def test_load_state_dict_refuses_a_different_order():
    state = ResumableSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="field 'seed'"):
        ResumableSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="field 'num_samples'"):
        ResumableSampler(11, seed=1).load_state_dict(state)


def test_blend_follows_weights_in_every_prefix_and_is_deterministic():
    a = [("a", i) for i in range(30)]
    b = [("b", i) for i in range(500)]
    blend = BlendedDataset([a, b], [0.7, 0.3], size=1000)
    assert blend.counts().tolist() == [700, 300]
    source = np.array([blend[i][0] == "a" for i in range(1000)])
    prefix = np.cumsum(source) / np.arange(1, 1001)
    assert np.all(np.abs(prefix * np.arange(1, 1001) - 0.7 * np.arange(1, 1001)) <= 1.0)
    same = BlendedDataset([a, b], [7, 3], size=1000)
    assert [blend[i] for i in range(1000)] == [same[i] for i in range(1000)]
    a_items = [blend[i][1] for i in range(1000) if source[i]]
    assert a_items[:60] == list(range(30)) * 2, "small datasets are cycled in order"
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([a, b], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        BlendedDataset([a, b], [1.0, -1.0])


def test_blend_of_preprocessed_datasets_batches_deterministically(tmp_path: Path):
    for name, n in (("judgments", 40), ("instructions", 100)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(f'{{"prompt": "{name} {i}?", "response": "answer {i}"}}\n' for i in range(n)))
        preprocess(PreprocessConfig([tmp_path / f"{name}.jsonl"], tmp_path / name, "char", progress=False))
    parts = [PreprocessedDataset(tmp_path / "judgments"), PreprocessedDataset(tmp_path / "instructions")]
    blend = BlendedDataset(parts, [0.5, 0.5], size=120)
    assert blend.sequence_lengths.tolist() == [len(blend[i][0]) for i in range(120)]

    def batches(rank: int) -> list:
        batcher = PaddedBatcher(blend, ResumableSampler(len(blend), dp_rank=rank, dp_size=2, seed=4), 4,
                                bucket_size=2)
        return [next(batcher)["tokens"].tolist() for _ in range(5)]

    assert batches(0) == batches(0) and batches(0) != batches(1)
