"""Per-request random streams: a sample's draws depend on its seed, its prompt and its number, nothing else.

One generator shared by a whole generate call makes a sample depend on its company: the same prompt drawn
beside other prompts, in waves of another size, on another number of data-parallel ranks or from another
evaluation chunk gets other tokens. Here every request has a 64-bit key, ``blake2b(seed, prompt ids, m)``
for the m-th sample of that prompt in the call, and its t-th token is drawn with the uniform
``splitmix64(key + golden·(t+1))`` by inverting the (filtered, tempered) distribution's CDF. The keys are
computed on the host, the uniforms with int64 tensor ops on the logits' device (the same bits on CPU and
GPU), so only round-off in the logits themselves can make a sample differ between layouts.

The arithmetic is SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; Java's ``SplittableRandom``), written
with wrapping int64 multiplies and masked shifts because torch has no unsigned 64-bit type.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def request_keys(seed: int, prompts: Sequence[Sequence[int]], n: int) -> list[int]:
    """Keys of the ``n`` samples of each prompt, in generate's order [p0s0, p0s1, ..., p1s0, ...].

    The m-th sample of a prompt's content (counting its earlier copies in the list) gets the same key in any
    call: ``generate([P, P], n=1)`` draws what ``generate([P], n=2)`` does, and other prompts change nothing.
    """
    seen: dict[bytes, int] = {}
    keys = []
    for prompt in prompts:
        content = hashlib.blake2b(array("q", prompt).tobytes(), digest_size=16).digest()
        first = seen.get(content, 0)
        seen[content] = first + n
        for m in range(first, first + n):
            digest = hashlib.blake2b(f"{seed}:{m}:".encode() + content, digest_size=8).digest()
            keys.append(_signed(int.from_bytes(digest, "little")))
    return keys


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def stream_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits): the ``counters``-th draw of each key's stream."""
    z = keys.long() + counters.long().add(1).mul(_signed(_GOLDEN))
    z = (z ^ _shift_right(z, 30)).mul(_signed(_MIX1))
    z = (z ^ _shift_right(z, 27)).mul(_signed(_MIX2))
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).double() * 2.0**-53


def splitmix64_reference(key: int, counter: int) -> float:
    """The same uniform in plain Python integers (the tests hold the tensor version to it)."""
    z = (key + _GOLDEN * (counter + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Megatron-Core's top-k / top-p filtering (its static and dynamic samplers' semantics), out of place.

    Top-k keeps every logit >= the k-th largest; top-p keeps the most probable tokens up to and including
    the one whose cumulative probability first exceeds ``top_p`` (and always the most probable). 0 = off.
    """
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p  # what comes after the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn with that row's uniform by the inverse CDF of
    softmax(filter(logits / temperature)). ``top_k == 1`` is the argmax. A token of probability 0 is
    never drawn."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    filtered = filter_logits(scaled, top_k, top_p)
    # Unnormalised: the draw compares the target with the running sum scaled by its own total.
    cdf = (filtered - filtered.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
    total = cdf[..., -1:]
    target = (uniforms.to(cdf.device).unsqueeze(-1) * total).float()
    # Below the total even where rounding reaches it, so the first token whose cumulative probability
    # exceeds the target exists and has probability > 0 (a zero adds nothing to the cumulative sum).
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)
