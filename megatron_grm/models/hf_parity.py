"""Running the same tokens through transformers and our Megatron model, to prove a conversion exact.

Used by ``tools/verify_conversion.py`` and the conversion tests. Megatron side: one process, TP=1/PP=1,
an explicit causal mask, logits cut back from the padded vocabulary to the real one. Greedy decoding on
the Megatron side is a plain full-recompute argmax loop: slow, but with nothing to get wrong.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import Tensor


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def causal_mask(seq: int) -> Tensor:
    """Megatron's convention: bool [1, 1, s, s], True = masked out."""
    return torch.ones(seq, seq, dtype=torch.bool).triu(diagonal=1)[None, None]


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: Tensor, vocab_size: int) -> Tensor:
    """[b, s, vocab] fp32 logits of a TP=1/PP=1 GPTModel, its GEMMs on torch's matmul as transformers' are
    (on a CPU, training forwards go through oneDNN, whose summation order alone moves SmolLM2-135M's logits
    by 1.3e-4; 5.8e-5 on torch's matmul: docs/conversion.md)."""
    from megatron_grm.parallel.onednn_training import megatrons_forward

    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    with megatrons_forward():
        logits = model(tokens, position_ids, causal_mask(s).to(tokens.device))
    return logits[..., :vocab_size].float()


def load_hf_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """transformers' model with eager attention (the reference implementation, soft-capping included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager",
                                                 local_files_only=True)
    return model.eval()


@torch.no_grad()
def hf_logits(model, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens).logits.float()


@torch.no_grad()
def megatron_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    vocab_size: int) -> list[list[int]]:
    """Exactly ``max_new_tokens`` greedy tokens per prompt (EOS is not special), recomputing everything each step.

    The prompts run as one right-padded batch: under the causal mask a row's last real token never sees
    the padding after it, so each row's next token is the one it would get alone.
    """
    rows = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        logits = megatron_logits(model, tokens, vocab_size)
        for i, r in enumerate(rows):
            r.append(int(logits[i, len(r) - 1].argmax()))
    return [r[len(p):] for r, p in zip(rows, prompts)]


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` (KV cache) for exactly ``max_new_tokens`` tokens, EOS not special."""
    input_ids = torch.tensor([list(prompt)])
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens, config.min_new_tokens = False, max_new_tokens, None
    config.eos_token_id = []  # None would fall back to the model's EOS
    config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out[0, len(prompt):].tolist()
