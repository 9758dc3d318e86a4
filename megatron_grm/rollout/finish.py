"""Where a sample ends: at an end id (EOS, a turn-end token), at the first stop string, or at max_new_tokens.

Pure functions over token ids and a ``decode`` callable, so the rule is the same for every backend and
testable without a model. Stop strings are matched on decoded text (a stop string can span several
tokens, or end inside one); the sample keeps every token up to and including the one that completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

Decode = Callable[[Sequence[int]], str]


def stop_text_decoder(tokenizer) -> Decode:
    """The text stop strings are matched on: special tokens written out, so that a stop string that is a
    special token (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``) matches as well as plain text."""
    return lambda ids: tokenizer.decode(list(ids), skip_special=False)


def first_stop_end(token_ids: Sequence[int], stop: Sequence[str], decode: Decode) -> int | None:
    """The smallest k such that ``decode(token_ids[:k])`` contains a stop string, or None.

    Containment only grows with k, so a binary search needs O(log n) decodes instead of n.
    """
    if not stop or not token_ids:
        return None

    def hit(k: int) -> bool:
        text = decode(token_ids[:k])
        return any(s in text for s in stop)

    if not hit(len(token_ids)):
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finish(
    token_ids: Sequence[int], end_ids: Collection[int], stop: Sequence[str], decode: Decode | None
) -> tuple[int, str]:
    """(number of generated tokens to keep, finish reason "stop" | "length"); the sample ends at its first
    end id (kept), or where a stop string first completes."""
    keep, reason = len(token_ids), "length"
    first_end = next((k for k, token in enumerate(token_ids) if token in end_ids), None)
    if first_end is not None:
        keep, reason = first_end + 1, "stop"
    if stop and decode is not None:
        k = first_stop_end(token_ids[:keep], stop, decode)
        if k is not None:
            keep, reason = k, "stop"
    return keep, reason


def stop_window(stop: Sequence[str]) -> int:
    """Tokens to decode at the end of a growing sample to see a stop string just completed.

    Every token carries at least one byte and a character at most four, so the last ``4·len + 4``
    tokens hold any stop string that ends at the last token. Used only for early termination; the exact
    cut is :func:`finish` on the whole sample.
    """
    return 4 * max((len(s) for s in stop), default=0) + 4


def tail_has_stop(tail_ids: Sequence[int], stop: Sequence[str], decode: Decode) -> bool:
    text = decode(tail_ids)
    return any(s in text for s in stop)
