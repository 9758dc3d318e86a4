"""train/producers.LengthBucketedProducer with ``pack``: each DP rank gets a like share of the step's sorted batch,
short samples share rows, and the step keeps its samples and its loss (bootstrap.pack in the CPU demo)."""

from __future__ import annotations

import textwrap
from collections import Counter

import numpy as np
import pytest

from megatron_grm.train.producers import LengthBucketedProducer
from tests.conftest import python_json


def mixed_samples(n: int = 64, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """A third short pairs (8-20 tokens), the rest long judgments (60-100 tokens), loss on each one's tail."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        length = int(rng.integers(8, 21)) if k % 3 == 0 else int(rng.integers(60, 101))
        ids = [int(t) for t in rng.integers(3, 200, size=length)]
        samples.append((ids, [0] * (length // 2) + [1] * (length - length // 2)))
    return samples


def rank_batches(samples, dp_rank: int, dp_size: int, pack: bool, steps: int = 3, micro_batch_size: int = 4,
                 **options):
    producer = LengthBucketedProducer(samples, 16, micro_batch_size, 128, pad_id=0, seed=5, pack=pack, **options)
    producer.dp_rank, producer.dp_size = dp_rank, dp_size  # what a DP group of dp_size would give this rank
    return producer, [producer.next_batch(step) for step in range(steps)]


def documents(batch) -> list[tuple[int, ...]]:
    """The documents of a micro-batch: runs of real tokens (ids >= 3 here; padding is 0) whose position ids
    restart at 0 for each document."""
    out = []
    for tokens, positions in zip(batch["tokens"].tolist(), batch["position_ids"].tolist()):
        for t, p in zip(tokens, positions):
            if t == 0:
                continue
            if p == 0:
                out.append([])
            out[-1].append(t)
    return [tuple(d) for d in out]


@pytest.mark.parametrize("dp_size,mbs", [(1, 8), (2, 4), (2, 8)])
def test_packed_steps_hold_every_sample_once_in_fewer_rows_with_as_many_micro_batches_per_rank(dp_size, mbs):
    samples = mixed_samples()
    producers = [rank_batches(samples, r, dp_size, pack=True, micro_batch_size=mbs) for r in range(dp_size)]
    plain = [rank_batches(samples, r, dp_size, pack=False, micro_batch_size=mbs) for r in range(dp_size)]
    for step in range(3):
        packed_docs = Counter(d for _, steps in producers for batch in steps[step] for d in documents(batch))
        plain_docs = Counter(d for _, steps in plain for batch in steps[step] for d in documents(batch))
        assert packed_docs == plain_docs and sum(packed_docs.values()) == 16  # the same 16 samples, once each
        counts = {len(steps[step]) for _, steps in producers}
        assert counts == {16 // dp_size // mbs}, "every rank runs as many micro-batches as without packing"
        rows = sum(b["tokens"].shape[0] for _, steps in producers for b in steps[step])
        assert rows < 16, "short samples share rows"
        for _, steps in producers:
            for batch in steps[step]:
                assert batch["tokens"].shape[0] <= mbs
                # a row's documents see only themselves: no query attends to a key of another document
                doc = (batch["position_ids"] == 0).long().cumsum(dim=1)
                allowed = ~batch["attention_mask"][:, 0]
                assert not (allowed & (doc[:, :, None] != doc[:, None, :])).any()
    assert producers[0][0].padding_waste < plain[0][0].padding_waste
    # every rank accounts for the whole step alike, from the lengths alone
    assert len({p.padding_waste for p, _ in producers}) == 1


def test_with_fixed_shapes_packing_keeps_every_micro_batch_at_micro_batch_size_rows():
    _, steps = rank_batches(mixed_samples(), 0, 2, pack=True, uniform_length=True)
    shapes = {tuple(b["tokens"].shape) for batches in steps for b in batches}
    assert all(rows == 4 for rows, _ in shapes)
    assert len({width for _, width in shapes}) <= 3  # one width per step


def test_a_packed_step_has_the_loss_of_the_padded_step_on_a_megatron_model():
    """The tiny GPTModel's summed response NLL and token count over one step's micro-batches, packed and
    padded: the same tokens, attended the same way, so the same loss up to summation order."""
    out = python_json(textwrap.dedent("""
        import json, tempfile
        from megatron_grm.stages.common import load_config, prepare_run
        from megatron_grm.train.producers import LengthBucketedProducer
        from megatron_grm.stages.sft import SupervisedObjective
        from megatron_grm.train.loop import Trainer
        from tests.stages.test_packed_bucketing import mixed_samples

        run = prepare_run(load_config("sft", ["model=tiny", f"trainer.run_dir={tempfile.mkdtemp()}",
                                              "trainer.micro_batch_size=4", "trainer.global_batch_size=16",
                                              "trainer.seq_length=128"]))
        trainer = Trainer(run)
        losses = {}
        for pack in (False, True):
            producer = LengthBucketedProducer(mixed_samples(), 16, 4, 128, pad_id=0, seed=5, pack=pack)
            batches = producer.next_batch(0)
            loss, _ = trainer.forward_backward(batches, SupervisedObjective(True), forward_only=True)
            losses[pack] = [float(loss[0]), float(loss[1]), sum(b["tokens"].numel() for b in batches)]
        print(json.dumps(losses))
        from megatron_grm.parallel import destroy_parallel
        destroy_parallel()
    """))
    (plain_nll, plain_count, plain_positions), (packed_nll, packed_count, packed_positions) = out["false"], out["true"]
    assert packed_count == plain_count > 0
    assert packed_nll == pytest.approx(plain_nll, rel=1e-5)
    assert packed_positions < plain_positions
