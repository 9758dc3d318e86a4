"""The example schema every reader produces and every stage consumes.

An *example* (paper §2-3, pointwise GRM input) is a conversation context whose last turn is the user
query, n >= 1 candidate responses, and a label: for n >= 2 the index of the best response (optionally a
full ranking and a preference strength), for n = 1 a 0/1 correctness label (the single-response case of
paper Eq. 10). Validation lives here, once, so a reader only has to say *where* a bad value came from.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

ROLES = ("system", "user", "assistant")


class ExampleError(ValueError):
    """A field of an example is invalid; ``field`` names it so readers can report file/line/field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"field '{field_name}': {message}")
        self.field = field_name
        self.reason = message


@dataclass(frozen=True)
class Turn:
    """One turn of the conversation context."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ExampleError("role", f"must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ExampleError("content", f"must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Example:
    """A labelled reward-modelling example.

    ``label``: for n >= 2 the 0-based index of the best response; for n = 1 the 0/1 correctness label.
    ``ranking``: optional full order of response indices, best first (``ranking[0] == label``).
    ``preference_strength``: optional non-negative margin of the best response over the others.
    ``category``: a '/'-separated path used for per-category metrics (e.g. RMB's category path).
    """

    context: tuple[Turn, ...]
    responses: tuple[str, ...]
    label: int
    source: str
    id: str
    ranking: tuple[int, ...] | None = None
    preference_strength: float | None = None
    category: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so examples are immutable.
        object.__setattr__(self, "context", tuple(self.context))
        object.__setattr__(self, "responses", tuple(self.responses))
        if self.ranking is not None:
            object.__setattr__(self, "ranking", tuple(self.ranking))
        _validate(self)

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def best_index(self) -> int | None:
        """The labelled best response for n >= 2; None for single-response examples."""
        return self.label if self.num_responses >= 2 else None

    @property
    def query(self) -> str:
        """The user query: the last turn of the context."""
        return self.context[-1].content


def _validate(ex: Example) -> None:
    if not ex.context:
        raise ExampleError("context", "must contain at least one turn")
    for i, turn in enumerate(ex.context):
        if not isinstance(turn, Turn):
            raise ExampleError(f"context[{i}]", f"must be a Turn, got {type(turn).__name__}")
    if ex.context[-1].role != "user":
        raise ExampleError("context", f"last turn must be the user query, got role {ex.context[-1].role!r}")
    n = len(ex.responses)
    if n < 1:
        raise ExampleError("responses", "must contain at least one response")
    for i, r in enumerate(ex.responses):
        if not isinstance(r, str):
            raise ExampleError(f"responses[{i}]", f"must be a string, got {type(r).__name__}")
    if not _is_int(ex.label):
        raise ExampleError("label", f"must be an integer, got {ex.label!r}")
    if n == 1 and ex.label not in (0, 1):
        raise ExampleError("label", f"must be 0 or 1 for a single response, got {ex.label}")
    if n >= 2 and not 0 <= ex.label < n:
        raise ExampleError("label", f"must be a response index in [0, {n - 1}], got {ex.label}")
    if ex.ranking is not None:
        if n < 2:
            raise ExampleError("ranking", "only defined for n >= 2 responses")
        if not all(_is_int(i) for i in ex.ranking) or sorted(ex.ranking) != list(range(n)):
            raise ExampleError("ranking", f"must be a permutation of 0..{n - 1}, got {list(ex.ranking)}")
        if ex.ranking[0] != ex.label:
            raise ExampleError("ranking", f"must start with the label {ex.label}, got {list(ex.ranking)}")
    if ex.preference_strength is not None:
        s = ex.preference_strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ExampleError("preference_strength", f"must be a finite number >= 0, got {s!r}")
    if not isinstance(ex.source, str) or not ex.source:
        raise ExampleError("source", "must be a non-empty string")
    if not isinstance(ex.id, str) or not ex.id:
        raise ExampleError("id", "must be a non-empty string")
    if not isinstance(ex.category, str):
        raise ExampleError("category", "must be a string")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def permute_example(example: Example, perm: Sequence[int]) -> Example:
    """Reorder the responses: position k shows original response ``perm[k]``; label/ranking follow.

    Readers keep the file's order (RMB always lists the chosen response first); stages that must not
    leak the label through position use this with :func:`megatron_grm.spct.sample_permutation`.
    """
    n = example.num_responses
    if sorted(perm) != list(range(n)):
        raise ValueError(f"perm must be a permutation of 0..{n - 1}, got {list(perm)}")
    position = {orig: k for k, orig in enumerate(perm)}
    responses = tuple(example.responses[i] for i in perm)
    if n == 1:
        return replace(example, responses=responses)
    ranking = None if example.ranking is None else tuple(position[i] for i in example.ranking)
    return replace(example, responses=responses, label=position[example.label], ranking=ranking)


def shuffle_responses(example: Example, rng: random.Random) -> Example:
    """Randomly reorder the responses (a seeded ``random.Random``); see :func:`permute_example`."""
    perm = list(range(example.num_responses))
    rng.shuffle(perm)
    return permute_example(example, perm)
