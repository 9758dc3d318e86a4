"""Real tokenizers that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mistral_sentencepiece_models() -> list[Path]:
    """Real SentencePiece models from mistral-common: v1 (Llama-2 style, 32000) and v3 (32768)."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.origin, (
        "tests need mistral-common: pip install --no-deps mistral-common==1.13.1")
    data = Path(spec.origin).parent / "data"
    return [data / "tokenizer.model.v1", data / "mistral_instruct_tokenizer_240323.model.v3"]
