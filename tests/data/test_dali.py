"""The DALI path yields the same batches as the PyTorch path (skipped where DALI is not installed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from megatron_grm.data.dali import dali_available, make_padded_loader
from megatron_grm.data.packing import PaddedBatcher
from megatron_grm.data.preprocess import PreprocessConfig, PreprocessedDataset, preprocess
from megatron_grm.data.sampler import ResumableSampler


def _dataset(tmp_path: Path) -> PreprocessedDataset:
    lines = "".join(f'{{"prompt": "q{i} {"x" * (i % 13)}", "response": "r{i}"}}\n' for i in range(64))
    (tmp_path / "d.jsonl").write_text(lines)
    preprocess(PreprocessConfig([tmp_path / "d.jsonl"], tmp_path / "out", "char", progress=False))
    return PreprocessedDataset(tmp_path / "out")


def test_without_dali_the_pytorch_path_runs_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    if dali_available():
        pytest.skip("nvidia.dali is installed; this checks the fallback")
    batcher = PaddedBatcher(_dataset(tmp_path), ResumableSampler(64), 4)
    with caplog.at_level(logging.INFO, logger="megatron_grm.data.dali"):
        assert make_padded_loader(batcher) is batcher
    assert "data path: PyTorch batcher (nvidia.dali not installed)" in caplog.text
    with pytest.raises(RuntimeError, match="nvidia.dali is not importable"):
        make_padded_loader(batcher, use_dali=True)


@pytest.mark.skipif(not dali_available(),
                    reason="nvidia-dali is not installed (optional; NGC images ship it)")
@pytest.mark.parametrize("seq_length", [None, 64])
def test_dali_batches_equal_pytorch_batches(tmp_path: Path, seq_length: int | None):
    dataset = _dataset(tmp_path)

    def batcher() -> PaddedBatcher:
        return PaddedBatcher(dataset, ResumableSampler(len(dataset), seed=5), 4, seq_length=seq_length,
                             bucket_size=3)

    torch_path = batcher()
    dali_path = make_padded_loader(batcher(), use_dali=True)
    for _ in range(10):
        want, got = next(torch_path), next(dali_path)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert dali_path.state_dict() == torch_path.state_dict()
    assert dali_path.padding_waste == torch_path.padding_waste
