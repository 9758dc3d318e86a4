"""Batches follow the trainer's contract: no attention across documents, loss on exactly the responses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_grm.data.packing import PackedBatcher, PaddedBatcher, collate_padded, pack_documents, plan_rows
from megatron_grm.data.sampler import ResumableSampler

PAD = 0


def make_documents(n: int, seed: int = 0, max_len: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents of random length: a prompt (BOS first) then a response of at least one token."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        prompt, response = int(rng.integers(2, max_len // 2)), int(rng.integers(1, max_len // 2))
        ids = rng.integers(3, 500, size=prompt + response)
        ids[0] = 1
        docs.append((ids, np.r_[np.zeros(prompt, np.uint8), np.ones(response, np.uint8)]))
    return docs


def check_contract(batch: dict[str, torch.Tensor]) -> None:
    b, s = batch["tokens"].shape
    assert batch["tokens"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["position_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (b, 1, s, s)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.all(batch["labels"][:, -1] == PAD)
    assert not batch["attention_mask"].all(dim=-1).any(), "a fully masked row gives NaN with -inf masking"


def test_packed_batches_never_attend_across_documents():
    docs = make_documents(60)
    batcher = PackedBatcher(docs, ResumableSampler(len(docs), seed=3, num_epochs=1), micro_batch_size=3,
                            seq_length=64)
    batches = list(batcher)
    assert batcher.stats["documents"] == 60 and len(batches) < 60 / 3, "rows hold several documents"
    for batch in batches:
        check_contract(batch)
        for r in range(3):
            allowed = ~batch["attention_mask"][r, 0]
            position = batch["position_ids"][r]
            # document id per position: count of document starts so far; padding gets its own id
            doc = torch.cumsum((position == 0).long(), 0)
            for q in range(64):
                keys = allowed[q].nonzero().flatten()
                assert torch.all(keys <= q), "causal"
                assert torch.all(doc[keys] == doc[q]), f"row {r} query {q} attends to another document"


def test_changing_one_document_leaves_the_attention_output_of_others_unchanged():
    docs = make_documents(8, seed=1)
    batch = pack_documents(docs, seq_length=200)
    assert batch["tokens"].shape[0] == 1
    embed = torch.nn.Embedding(500, 16)
    allowed = ~batch["attention_mask"]  # torch SDPA: True = may attend

    def attend(tokens: torch.Tensor) -> torch.Tensor:
        x = embed(tokens)[:, None]  # [b, heads=1, s, d]
        return F.scaled_dot_product_attention(x, x, x, attn_mask=allowed)[:, 0]

    before = attend(batch["tokens"])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    third = slice(starts[2], starts[3])
    changed = batch["tokens"].clone()
    changed[0, third] = torch.randint(3, 500, changed[0, third].shape)
    after = attend(changed)
    outside = torch.ones(200, dtype=torch.bool)
    outside[third] = False
    assert torch.equal(before[0, outside], after[0, outside])
    assert not torch.equal(before[0, third], after[0, third])


def test_position_ids_restart_at_each_packed_document():
    docs = make_documents(10, seed=2)
    batch = pack_documents(docs, seq_length=128, num_rows=4)
    expected = []
    for row in plan_rows([len(d[0]) for d in docs], 128):
        positions = np.concatenate([np.arange(len(docs[i][0])) for i in row])
        expected.append(np.r_[positions, np.zeros(128 - len(positions), np.int64)])
    expected += [np.zeros(128, np.int64)] * (4 - len(expected))
    assert torch.equal(batch["position_ids"], torch.as_tensor(np.stack(expected)))


def test_loss_mask_covers_exactly_the_response_tokens():
    docs = make_documents(40, seed=4)
    sampler = ResumableSampler(len(docs), shuffle=False, num_epochs=1)
    batcher = PackedBatcher(docs, sampler, micro_batch_size=2, seq_length=80)
    labelled = torch.cat([b["labels"][b["loss_mask"] == 1] for b in batcher])
    assert torch.equal(labelled, torch.as_tensor(np.concatenate([ids[mask == 1] for ids, mask in docs])))
    batch = pack_documents(docs[:6], seq_length=120)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert torch.all(batch["loss_mask"][0, starts[1:] - 1] == 0), "no loss across a document boundary"
    assert set(batch["loss_mask"].unique().tolist()) <= {0.0, 1.0}


def test_collate_padded_masks_padding_and_counts_it():
    docs = make_documents(5, seed=5)
    batch = collate_padded(docs, seq_length=48)
    check_contract(batch)
    for r, (ids, mask) in enumerate(docs):
        n = len(ids)
        assert torch.equal(batch["tokens"][r, :n], torch.as_tensor(ids))
        assert torch.all(batch["tokens"][r, n:] == PAD) and torch.all(batch["loss_mask"][r, n - 1:] == 0)
        assert torch.equal(batch["loss_mask"][r, : n - 1], torch.as_tensor(mask[1:], dtype=torch.float32))
        masked = batch["attention_mask"][r, 0]
        pad_keys_seen = (~masked)[:, n:]
        assert torch.equal(pad_keys_seen, torch.eye(48, dtype=torch.bool)[:, n:]), "pad seen only by itself"
    assert collate_padded(docs)["tokens"].shape == (5, max(len(d[0]) for d in docs))


def test_batchers_report_padding_waste_and_bucketing_reduces_it():
    docs = make_documents(256, seed=6, max_len=120)
    total = sum(len(d[0]) for d in docs)

    def waste(batcher: PaddedBatcher | PackedBatcher) -> float:
        positions = sum(b["tokens"].numel() for b in batcher)
        assert batcher.stats["tokens"] == total and batcher.stats["documents"] == 256
        assert batcher.stats["pad_tokens"] == positions - total
        assert batcher.padding_waste == pytest.approx((positions - total) / positions)
        return batcher.padding_waste

    plain = waste(PaddedBatcher(docs, ResumableSampler(256, num_epochs=1), 8))
    bucketed = waste(PaddedBatcher(docs, ResumableSampler(256, num_epochs=1), 8, bucket_size=8))
    packed = waste(PackedBatcher(docs, ResumableSampler(256, num_epochs=1), 4, seq_length=256))
    assert 0 < bucketed < plain and 0 < packed < plain


def test_packed_batcher_resumes_exactly_from_its_state():
    docs = make_documents(50, seed=7)
    reference = PackedBatcher(docs, ResumableSampler(50, seed=1), 2, 64)
    expected = [next(reference) for _ in range(12)]
    first = PackedBatcher(docs, ResumableSampler(50, seed=1), 2, 64)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    resumed = PackedBatcher(docs, ResumableSampler(50, seed=1), 2, 64)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.stats == reference.stats


def test_bucketed_padded_batcher_resumes_exactly_from_its_state():
    docs = make_documents(64, seed=8)
    reference = PaddedBatcher(docs, ResumableSampler(64, seed=2), 4, bucket_size=4)
    expected = [next(reference)["tokens"] for _ in range(10)]
    for stop in (0, 3, 4, 6):
        first = PaddedBatcher(docs, ResumableSampler(64, seed=2), 4, bucket_size=4)
        for _ in range(stop):
            next(first)
        resumed = PaddedBatcher(docs, ResumableSampler(64, seed=2), 4, bucket_size=4)
        resumed.load_state_dict(first.state_dict())
        assert all(torch.equal(next(resumed)["tokens"], want) for want in expected[stop:])


def test_documents_that_do_not_fit_are_an_error_naming_them():
    docs = make_documents(3, seed=9)
    with pytest.raises(ValueError, match=r"document 1: \d+ tokens exceed seq_length=4"):
        pack_documents([(np.arange(3), np.ones(3))] + docs[1:], seq_length=4)
    truncated = collate_padded(docs, seq_length=4, truncate=True)
    assert truncated["tokens"].shape == (3, 4)
    with pytest.raises(ValueError, match="num_rows=1"):
        pack_documents(docs, seq_length=max(len(d[0]) for d in docs), num_rows=1)
    with pytest.raises(ValueError, match="loss-mask entries"):
        collate_padded([(np.arange(3), np.ones(2))])


def test_truncation_is_counted_and_logged(caplog: pytest.LogCaptureFixture):
    docs = make_documents(30, seed=10)
    seq = 20
    too_long = sum(len(ids) > seq for ids, _ in docs)
    assert 0 < too_long < len(docs)
    with caplog.at_level("WARNING", logger="megatron_grm.data.packing"):
        collate_padded(docs[:5], seq_length=seq, truncate=True)
    expected = sum(len(ids) > seq for ids, _ in docs[:5])
    assert f"collate_padded: truncated {expected} document(s) to seq_length={seq}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_grm.data.packing"):
        padded = PaddedBatcher(docs, ResumableSampler(30, num_epochs=1), 4, seq_length=seq, truncate=True)
        packed = PackedBatcher(docs, ResumableSampler(30, num_epochs=1), 2, seq_length=seq, truncate=True)
        list(padded), list(packed)
    assert padded.stats["truncated"] == packed.stats["truncated"] == too_long
    assert "PaddedBatcher: truncated document" in caplog.text and "PackedBatcher: truncated document" in caplog.text
    untouched = PaddedBatcher(docs, ResumableSampler(30, num_epochs=1), 4, seq_length=64)
    list(untouched)
    assert untouched.stats["truncated"] == 0


def test_truncation_count_survives_resume_exactly():
    docs = make_documents(40, seed=11)
    reference = PackedBatcher(docs, ResumableSampler(40, num_epochs=1), 2, 24, truncate=True)
    list(reference)
    first = PackedBatcher(docs, ResumableSampler(40, num_epochs=1), 2, 24, truncate=True)
    for _ in range(3):
        next(first)
    assert first._pending_cut, "a truncated document is read but not yet in a batch: counted once, after resume"
    resumed = PackedBatcher(docs, ResumableSampler(40, num_epochs=1), 2, 24, truncate=True)
    resumed.load_state_dict(first.state_dict())
    list(resumed)
    assert resumed.stats == reference.stats and reference.stats["truncated"] > 0
    old = {k: v for k, v in first.state_dict()["stats"].items() if k != "truncated"}  # a pre-count checkpoint
    legacy = PackedBatcher(docs, ResumableSampler(40, num_epochs=1), 2, 24, truncate=True)
    legacy.load_state_dict({**first.state_dict(), "stats": old})
    assert legacy.stats["truncated"] == 0


def test_batchers_refuse_to_resume_a_position_only_another_data_parallel_rank_can_continue():
    docs = make_documents(64, seed=8)
    packed = PackedBatcher(docs, ResumableSampler(64, dp_rank=0, dp_size=2, seed=1), 2, 64)
    next(packed)
    with pytest.raises(ValueError, match="written by data-parallel rank 0 of 2 on rank 0 of 1"):
        PackedBatcher(docs, ResumableSampler(64, seed=1), 2, 64).load_state_dict(packed.state_dict())
    padded = PaddedBatcher(docs, ResumableSampler(64, dp_rank=1, dp_size=2, seed=2), 4, bucket_size=4)
    at_window_start = padded.state_dict()
    next(padded)
    with pytest.raises(ValueError, match="a length-sorted window written by data-parallel rank 1 of 2"):
        PaddedBatcher(docs, ResumableSampler(64, seed=2), 4, bucket_size=4).load_state_dict(padded.state_dict())
    # At a window's start (nothing emitted from it yet) the sampler's consumed count is exact on any layout.
    PaddedBatcher(docs, ResumableSampler(64, seed=2), 4, bucket_size=4).load_state_dict(at_window_start)
