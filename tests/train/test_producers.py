"""The SFT-style batch producer resumes exactly, and refuses a resume that would reshuffle the epoch."""

from __future__ import annotations

import pytest

from megatron_grm.train.producers import SampleBatchProducer


def _producer(seed: int) -> SampleBatchProducer:
    samples = [([i + 1] * 3, [0, 1, 1]) for i in range(16)]
    return SampleBatchProducer(samples, global_batch_size=4, micro_batch_size=2, seq_length=8, pad_id=0, seed=seed)


def test_a_resume_continues_the_epoch_and_refuses_another_seed():
    reference = _producer(seed=1)
    batches = [reference.next_batch(step) for step in range(4)]
    first = _producer(seed=1)
    first.next_batch(0), first.next_batch(1)
    resumed = _producer(seed=1)
    resumed.load_state_dict(first.state_dict())
    for step in (2, 3):
        got, want = resumed.next_batch(step), batches[step]
        assert all((g["tokens"] == w["tokens"]).all() for g, w in zip(got, want))
    with pytest.raises(ValueError, match="trainer.seed=2 but the checkpoint was written with seed 1"):
        _producer(seed=2).load_state_dict(first.state_dict())
