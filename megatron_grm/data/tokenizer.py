"""One tokenizer interface over Hugging Face tokenizers, SentencePiece models and a tiny character vocab.

Training, preprocessing and rollout all turn (prompt, response) pairs into token ids. Doing that in
three places invites three slightly different BOS/EOS and chat conventions, so the rules live here:

* ``apply_chat`` renders a conversation to text: the tokenizer's own chat template for Hugging Face
  tokenizers, a fixed :class:`ChatFormat` for tokenizers that carry none (SentencePiece, char).
* ``encode(text, add_bos=True)`` prepends BOS unless the text already starts with it (chat templates
  such as Gemma's and Llama-3's write the BOS themselves), so BOS is never doubled.
* ``end_ids`` are the ids that end the model's turn: EOS, and the special token the chat template
  closes an assistant turn with when that is another one (Gemma's ``<end_of_turn>``; ChatML's
  ``<|im_end|>`` under a base model's ``<|endoftext|>``). Rollouts stop at any of them.
* :meth:`Tokenizer.encode_example` keeps the prompt's own ids (the ones rollout conditions on) and
  cuts the response's out of the prompt+response encoding, so the response mask is exact and a
  SentencePiece-style response (a ``.model`` file or its Hugging Face ``Metaspace`` conversion, as for
  Llama-2 and Mistral) has no dummy-prefix ``▁`` that the model would never produce right after the
  prompt. It makes sure the response ends with an end id (once: templates that close the assistant
  turn with one already carry it, and what the template writes after it, such as the newline after
  ChatML's ``<|im_end|>`` or Gemma's ``<end_of_turn>``, is dropped: generation stops there, so the
  model must not learn to go on; otherwise EOS is appended).
* Message content is data. A special token's string inside it (a judged response that contains
  ``<|im_end|>``) is encoded as ordinary text, so it cannot close the turn or start a new one; only
  what the chat template writes becomes special tokens. ``encode(text, literal=True)`` does the same
  for a whole text. Where no content holds such a string, the ids are exactly the library's.
* ``padded_vocab_size(tp)`` rounds the vocabulary up the way Megatron does (multiple of 128 x TP).

``load_tokenizer`` picks the implementation from what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, str]
Span = tuple[int, int]  # [start, end) character offsets of message content in a rendered text
CHAR_TOKENIZER_FILE = "char_tokenizer.json"
CHAT_ROLES = ("system", "user", "assistant")


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's rule: round the vocab up to a multiple of ``divisible_by * tp`` so every TP shard of
    the embedding and output layer has the same, GEMM-friendly width."""
    if vocab_size <= 0 or tp <= 0 or divisible_by <= 0:
        raise ValueError(f"vocab_size, tp and divisible_by must be positive, got {vocab_size}, {tp}, "
                         f"{divisible_by}")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


class ChatTemplateError(ValueError):
    """A chat template refused a conversation (e.g. Gemma's "System role not supported"); a ValueError,
    so per-record handling that catches bad values names the record instead of crashing."""


class TokenizationError(ValueError):
    """A text could not be encoded; ``part`` says which part of an example ("prompt" or "response")."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(f"{part}: {reason}")
        self.part = part
        self.reason = reason


@dataclass(frozen=True)
class ChatFormat:
    """Turn layout for tokenizers that ship no chat template (SentencePiece ``.model``, char).

    Each turn renders as ``prefix.format(role=...) + content + suffix``. ``role_names`` renames roles
    (Gemma calls the assistant "model"); with ``system_into_first_user`` a system turn is prepended to
    the first user turn, as Gemma's own template does, because the format has no system role.
    """

    prefix: str
    suffix: str
    role_names: dict[str, str] = field(default_factory=dict)
    system_into_first_user: bool = False

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        turns = list(messages)
        if self.system_into_first_user and turns and turns[0]["role"] == "system":
            system, turns = turns[0], turns[1:]
            if turns and turns[0]["role"] == "user":
                turns[0] = {"role": "user", "content": system["content"] + "\n\n" + turns[0]["content"]}
            else:
                turns.insert(0, {"role": "user", "content": system["content"]})
        parts = [self._open(t["role"]) + t["content"] + self.suffix for t in turns]
        if add_generation_prompt:
            parts.append(self._open("assistant"))
        return "".join(parts)

    def _open(self, role: str) -> str:
        return self.prefix.format(role=self.role_names.get(role, role))


GEMMA_CHAT = ChatFormat("<start_of_turn>{role}\n", "<end_of_turn>\n", {"assistant": "model"}, True)
PLAIN_CHAT = ChatFormat("<|{role}|>\n", "\n")


def validate_messages(messages: Any, name: str = "messages") -> list[Message]:
    """Check a chat message list; the error names the offending element, e.g. ``messages[2].role``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{name}: expected a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{name}[{i}]: expected an object with role and content")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"{name}[{i}].role: expected one of {CHAT_ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{name}[{i}].content: expected a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Tokenizer(ABC):
    """What every tokenizer offers; the shared BOS/EOS and example-encoding rules are defined here."""

    kind: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    uses_bos: bool  # whether this model family starts a sequence with BOS (Llama, Gemma: yes; Qwen: no)

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Plain library encoding, no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids back to text."""

    @abstractmethod
    def apply_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """Render a conversation as text (no tokenization)."""

    @abstractmethod
    def save(self, folder: str | os.PathLike) -> None:
        """Write what ``load_tokenizer(folder)`` needs to rebuild this tokenizer."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Kind, source path, ids and a content hash, for manifests and resume checks."""

    def _is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token rather than text; none by default."""
        return False

    def _special_strings(self) -> Sequence[str]:
        """The strings the library turns into special tokens wherever they occur in a text; none by default."""
        return ()

    def _encode_literal(self, text: str, at_start: bool = True) -> list[int]:
        """``text`` with special-token strings encoded as ordinary text; ``at_start`` is False for a piece
        that follows a special token (which is how the library encodes it)."""
        return self._encode(text)

    def _encode_continuation(self, text: str) -> list[int]:
        """``text`` as it is encoded after other text (no SentencePiece dummy prefix)."""
        return self._encode(text)

    @cached_property
    def end_ids(self) -> tuple[int, ...]:
        """The ids that end the model's turn, EOS first: rollouts stop at any of them."""
        turn_end = self._turn_end_id()
        return (self.eos_id,) if turn_end in (None, self.eos_id) else (self.eos_id, turn_end)

    def _turn_end_id(self) -> int | None:
        """The special token the chat template closes an assistant turn with, found by rendering one:
        generation must stop there, since the template starts the next turn after it."""
        probe = "Done."
        try:
            text = self.apply_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
            cut = text.rindex(probe) + len(probe)
            tail = text[cut:]
            ids = self._encode_response(text[:cut], tail) if tail else []  # as it follows the response
        except ValueError:  # a template that refuses the probe, a vocabulary without its characters
            return None
        if ids and self._is_special(ids[0]) and tail.startswith(self.decode(ids[:1])):
            return ids[0]
        return None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, literal: bool = False) -> list[int]:
        """Encode ``text``; BOS is prepended only if asked and not already there, EOS appended if asked.
        With ``literal`` the whole text is data: special-token strings in it are encoded as text."""
        ids = self._encode_marked(text, [(0, len(text))] if literal else [])
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def padded_vocab_size(self, tp: int = 1, divisible_by: int = 128) -> int:
        """Embedding rows the Megatron model needs for this tokenizer at tensor-parallel size ``tp``."""
        return padded_vocab_size(self.vocab_size, tp, divisible_by)

    def prompt_text(self, prompt: str | Sequence[Message], chat: bool = True) -> str:
        """The text a model sees before its answer: chat-formatted with the generation prompt, or a plain
        string prompt used verbatim when ``chat`` is False."""
        if isinstance(prompt, str) and not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.apply_chat(messages, add_generation_prompt=True)

    def encode_prompt(self, prompt: str | Sequence[Message], chat: bool = True, literal: bool = False) -> list[int]:
        """Token ids of a generation prompt (for rollout), with this family's BOS convention. Chat-formatted,
        message content is data (see the module docstring); a plain string with ``chat`` False is the model's
        input as given, special-token strings included, unless ``literal``."""
        if isinstance(prompt, str) and not chat:
            return self.encode(prompt, add_bos=self.uses_bos, literal=literal)
        text, spans = self._render_marked(self._as_messages(prompt), add_generation_prompt=True)
        return self._with_bos(self._encode_marked(text, spans))

    def encode_example(
        self, prompt: str | Sequence[Message], response: str, chat: bool = True, literal: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, response_mask) of one training example; the mask is 1 on exactly the response tokens,
        which end with an end id (EOS unless the template closes the turn with another special token).
        Special-token strings are read as in :meth:`encode_prompt`, in the response as in the prompt.
        Raises :class:`TokenizationError` naming the part that failed."""
        try:
            prompt_text = self.prompt_text(prompt, chat)
        except ValueError as err:  # ChatTemplateError too: the template refused this conversation
            raise TokenizationError("prompt", str(err)) from err
        content_end = None  # where the response's own text ends in the rendered turn (chat formats)
        if isinstance(prompt, str) and not chat:
            response_text = response
            prompt_spans = [(0, len(prompt_text))] if literal else []
            response_spans = [(0, len(response_text))] if literal else []
        else:
            messages = [*self._as_messages(prompt), {"role": "assistant", "content": response}]
            try:
                full, spans = self._render_marked(messages, add_generation_prompt=False)
            except ValueError as err:
                raise TokenizationError("prompt", str(err)) from err
            if not full.startswith(prompt_text):
                raise TokenizationError(
                    "response", "the chat template renders the prompt differently once a response follows, "
                    "so prompt and response cannot be split")
            response_text = full[len(prompt_text):]
            content_end = next((len(c) for c in (response, response.strip()) if c and response_text.startswith(c)),
                               None)
            cut = len(prompt_text)
            prompt_spans = [(a, b) for a, b in spans if b <= cut]
            response_spans = [(a - cut, b - cut) for a, b in spans if a >= cut]
        try:
            prompt_ids = self._encode_marked(prompt_text, prompt_spans)
        except ValueError as err:
            raise TokenizationError("prompt", str(err)) from err
        try:
            response_ids = self._encode_response(prompt_text, response_text, prompt_spans, response_spans, prompt_ids)
        except ValueError as err:
            raise TokenizationError("response", str(err)) from err
        prompt_ids = self._with_bos(prompt_ids)
        ends = [k for k, token in enumerate(response_ids) if token in self.end_ids]
        raw = isinstance(prompt, str) and not chat and not literal  # special-token strings are tokens here
        if raw and ends and (len(ends) > 1 or self.decode(response_ids[ends[-1] + 1:]).strip()):
            raise TokenizationError(
                "response", f"holds the end token {self.decode([response_ids[ends[0]]])!r} before its end: "
                "generation would stop there and never write the rest (chat=false reads special-token "
                "strings as tokens)")
        if ends:
            # The template closed the turn with an end id. Whatever it writes after it (the "\n" after
            # ChatML's <|im_end|> or Gemma's <end_of_turn>) only separates turns; generation stops at the
            # end id and never produces it.
            if not self.decode(response_ids[ends[-1] + 1:]).strip():
                response_ids = response_ids[:ends[-1] + 1]
        else:
            if content_end is not None and content_end < len(response_text):
                # The template closes the turn in plain text (a template-less HF folder, the character
                # tokenizer, Gemma's format on a vocabulary without <end_of_turn>): generation stops only at
                # EOS, so the target is the response's own text, then EOS. Trained on the closing text too,
                # the model would write it, and a kept judgment re-encoded from its sampled text would carry
                # it twice (RFT round after round).
                response_ids = self._encode_response(prompt_text, response_text[:content_end], prompt_spans,
                                                     [(a, b) for a, b in response_spans if b <= content_end],
                                                     prompt_ids)
            response_ids.append(self.eos_id)
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    def _encode_response(self, prompt_text: str, response_text: str, prompt_spans: Sequence[Span] = (),
                         response_spans: Sequence[Span] = (), prompt_ids: Sequence[int] | None = None) -> list[int]:
        """The response's ids as the tokenizer gives them in context. Encoded on its own, a text gets the
        dummy prefix of SentencePiece-style vocabularies (Llama-2 / Mistral ``.model`` files, and their
        Hugging Face ``Metaspace`` conversions): "Four." becomes "▁Four" where after the prompt's "]" or
        "\n" it is "F", "our" — a first token the model would never produce after the prompt. So the
        response is cut out of the prompt+response encoding. Where prompt and response merge into one
        piece at the boundary, the prompt keeps its own ids (the ones rollout conditions on) and the
        response is encoded as text that goes on from the prompt, with no "▁" of its own."""
        shift = len(prompt_text)
        if prompt_ids is None:
            prompt_ids = self._encode_marked(prompt_text, prompt_spans)
        full_ids = self._encode_marked(prompt_text + response_text,
                                       [*prompt_spans, *((a + shift, b + shift) for a, b in response_spans)])
        if full_ids[:len(prompt_ids)] == list(prompt_ids):
            return full_ids[len(prompt_ids):]
        return self._encode_marked(response_text, response_spans, at_start=False)

    # ------------------------------------------------------------------ message content is data
    @staticmethod
    def _as_messages(prompt: str | Sequence[Message]) -> list[Message]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.uses_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        strings = sorted({s for s in self._special_strings() if s}, key=len, reverse=True)  # longest match wins
        return re.compile("|".join(map(re.escape, strings))) if strings else None

    def _encode_marked(self, text: str, literal_spans: Sequence[Span], at_start: bool = True) -> list[int]:
        """Encode ``text`` reading special-token strings inside ``literal_spans`` as ordinary text; a text
        with no such string inside a span takes the library's own path, so its ids are the library's.
        ``at_start`` says whether the text opens the sequence (SentencePiece's dummy prefix goes only there)."""
        pattern = self._special_pattern
        matches = [] if pattern is None or not literal_spans else list(pattern.finditer(text))
        injected = [m for m in matches if any(a <= m.start() and m.end() <= b for a, b in literal_spans)]
        if not injected:
            return self._encode(text) if at_start else self._encode_continuation(text)
        return self._encode_injected(text, [m for m in matches if m not in injected], at_start)

    def _encode_injected(self, text: str, template: Sequence[re.Match[str]], at_start: bool) -> list[int]:
        """Encode ``text`` with only the ``template`` special-token strings read as special tokens. The
        library splits a text at special-token strings and encodes the pieces between them on their own;
        this does the same, splitting only at the template's."""
        ids: list[int] = []
        pos = 0
        for m in template:
            lstrip, rstrip = self._strips(m.group())
            before = text[pos:m.start()]
            ids += self._encode_literal(before.rstrip() if lstrip else before, at_start and pos == 0)
            ids += self._encode(m.group())  # the special token itself: its own piece, nothing prepended
            pos = m.end()
            if rstrip:  # the library's AddedToken(rstrip=True) swallows the whitespace after it
                pos += len(text[pos:]) - len(text[pos:].lstrip())
        return ids + self._encode_literal(text[pos:], at_start and pos == 0)

    def _strips(self, special: str) -> tuple[bool, bool]:
        """Whether the library drops the whitespace before / after this special token's string."""
        return False, False

    def _render_marked(self, messages: Sequence[Message], add_generation_prompt: bool) -> tuple[str, list[Span]]:
        """The rendered conversation and where each message's content lies in it.

        Only needed when some content holds a special-token string; the template's layout is found by
        rendering the conversation with placeholders for the contents. A template that rewrites content
        beyond trimming it cannot be aligned: its special-token strings are then read as the library reads
        them, with a warning.
        """
        text = self.apply_chat(messages, add_generation_prompt)
        pattern = self._special_pattern
        if pattern is None or not any(pattern.search(m["content"]) for m in messages):
            return text, []
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        try:
            layout = self.apply_chat([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                     add_generation_prompt)
        except ValueError:  # a template that inspects content and refuses the placeholders
            layout = ""
        pieces = re.split("\ue000(\\d+)\ue001", layout)  # template text, message index, template text, ...
        spans = self._align(text, pieces, messages)
        if spans is not None:
            return text, spans
        log.warning("the chat template rewrites message content, so special-token strings inside it cannot be "
                    "told from the template's own and are encoded as special tokens")
        return text, []

    @staticmethod
    def _align(text: str, pieces: Sequence[str], messages: Sequence[Message]) -> list[Span] | None:
        """Content spans of ``text`` given the template's layout ``pieces`` (template text, message index,
        template text, ...), each content as given or trimmed; None when ``text`` does not fit the layout."""
        if len(pieces) < 3 or not text.startswith(pieces[0]):
            return None
        spans: list[Span] = []
        pos = len(pieces[0])
        for k in range(1, len(pieces), 2):
            content, template = messages[int(pieces[k])]["content"], pieces[k + 1]
            last = k + 2 == len(pieces)
            for shown in (content, content.strip()):
                end = pos + len(shown)
                if text.startswith(shown, pos) and (text[end:] == template if last else text.startswith(template, end)):
                    break
            else:
                return None
            spans.append((pos, end))
            pos = end + len(template)
        return spans


def _sha256_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer from a model folder (or a GGUF file), using its own chat template."""

    kind = "hf"
    _FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "tokenizer.model", "vocab.json", "merges.txt")

    def __init__(self, path: str | os.PathLike, gguf_file: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.gguf_file = gguf_file
        kwargs: dict[str, Any] = {"local_files_only": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        self.hf = AutoTokenizer.from_pretrained(str(self.path), **kwargs)
        if self.hf.eos_token_id is None:
            raise ValueError(f"{self.path}: tokenizer defines no eos token")
        self.eos_id = int(self.hf.eos_token_id)
        self.bos_id = None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)
        self.pad_id = self.eos_id if self.hf.pad_token_id is None else int(self.hf.pad_token_id)
        self.vocab_size = len(self.hf)
        probe = self.hf.encode("a", add_special_tokens=True)
        self.uses_bos = self.bos_id is not None and probe[:1] == [self.bos_id]

    def _encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def _is_special(self, token_id: int) -> bool:
        added = self.hf.added_tokens_decoder.get(token_id)
        return added is not None and added.special

    def _special_strings(self) -> Sequence[str]:
        return [token.content for token in self.hf.added_tokens_decoder.values() if token.special]

    def _encode_literal(self, text: str, at_start: bool = True) -> list[int]:
        if not text:
            return []
        if not at_start and self._after_special_backend is not None:
            return list(self._after_special_backend.encode(text, add_special_tokens=False).ids)
        return list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _encode_continuation(self, text: str) -> list[int]:
        if self._continuation_backend is None:
            return self._encode(text)
        return list(self._continuation_backend.encode(text, add_special_tokens=False).ids)

    @cached_property
    def _after_special_backend(self) -> Any:
        """For a ``Metaspace`` tokenizer that prepends "▁" only at the start of a text (``prepend_scheme=
        "first"``, Mistral v3 and non-legacy Llama conversions): a copy that prepends none and reads
        special-token strings as text, to encode a piece that follows a special token as the library
        does. None for every other tokenizer, whose pieces encode alike wherever they are."""
        return self._backend_without_prepend(("first",), literal=True)

    @cached_property
    def _continuation_backend(self) -> Any:
        """For a tokenizer that prepends "▁" to a text (``Metaspace``, a ``Prepend`` normalizer): a copy that
        does not, to encode text that goes on from other text. None for every other tokenizer."""
        return self._backend_without_prepend(("first", "always"), literal=False)

    def _backend_without_prepend(self, schemes: tuple[str, ...], literal: bool) -> Any:
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None or not any(kind in f"{backend.pre_tokenizer}{backend.normalizer}"
                                      for kind in ("Metaspace", "Prepend")):
            return None  # byte-level and most others: no copy (a large vocabulary's JSON takes a second)
        spec = json.loads(backend.to_str())
        changed = False
        stack = [spec.get("pre_tokenizer")]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if node.get("type") == "Metaspace" and node.get("prepend_scheme") in schemes:
                    node["prepend_scheme"], changed = "never", True
                stack.extend(node.get("pretokenizers") or [])
        normalizer = spec.get("normalizer")
        if "always" in schemes and isinstance(normalizer, dict):  # Prepend("▁") runs on every piece
            if normalizer.get("type") == "Prepend":
                spec["normalizer"], changed = None, True
            elif normalizer.get("type") == "Sequence":
                kept = [n for n in normalizer.get("normalizers", []) if n.get("type") != "Prepend"]
                changed = changed or len(kept) < len(normalizer.get("normalizers", []))
                normalizer["normalizers"] = kept
        if not changed:
            return None
        from tokenizers import Tokenizer as Backend

        copy = Backend.from_str(json.dumps(spec))
        copy.encode_special_tokens = literal
        return copy

    def _strips(self, special: str) -> tuple[bool, bool]:
        token = self._added_by_content.get(special)
        return (bool(token.lstrip), bool(token.rstrip)) if token is not None else (False, False)

    @cached_property
    def _added_by_content(self) -> dict[str, Any]:
        return {token.content: token for token in self.hf.added_tokens_decoder.values()}

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def apply_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        if not self.hf.chat_template:
            return PLAIN_CHAT.render(messages, add_generation_prompt)
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as err:  # raise_exception(...) in the template, or a broken template
            raise ChatTemplateError(f"the chat template of {self.path} refused the conversation: {err}") from err

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(folder))

    def describe(self) -> dict[str, Any]:
        if self.gguf_file:
            files = [self.path / self.gguf_file]
        else:
            files = [self.path / name for name in self._FILES if (self.path / name).is_file()]
        return {"kind": self.kind, "path": str(self.path / (self.gguf_file or "")).rstrip("/"),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "sha256": _sha256_files(files)}


class SentencePieceTokenizer(Tokenizer):
    """A raw SentencePiece ``.model`` file (Gemma / Llama-2 style); chat turns use a :class:`ChatFormat`."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, chat_format: ChatFormat = GEMMA_CHAT) -> None:
        import sentencepiece

        self.path = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.chat_format = chat_format
        bos, eos, pad, unk = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()
        if eos < 0:
            raise ValueError(f"{self.path}: SentencePiece model defines no eos piece")
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos
        self.pad_id = pad if pad >= 0 else (unk if unk >= 0 else eos)
        self.vocab_size = self.sp.get_piece_size()
        self.uses_bos = self.bos_id is not None

    def _encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def _is_special(self, token_id: int) -> bool:
        return token_id in self._control_and_user_defined

    @cached_property
    def _control_and_user_defined(self) -> frozenset[int]:
        """Control pieces and user-defined ones: Gemma's <start_of_turn>/<end_of_turn> are user-defined,
        matched in text as one piece."""
        proto = self._proto()
        kinds = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED)
        return frozenset(i for i, piece in enumerate(proto.pieces) if piece.type in kinds)

    def _special_strings(self) -> Sequence[str]:
        # Control pieces (<s>, </s>) are never matched in text; user-defined ones always are.
        return [self.sp.id_to_piece(i) for i in self._control_and_user_defined if not self.sp.is_control(i)]

    def _encode_injected(self, text: str, template: Sequence[re.Match[str]], at_start: bool) -> list[int]:
        """The library's encoding of ``text``, with each user-defined piece that is not the template's
        spelled out by a copy of the model that has those pieces marked unused (which encoding never
        produces). Splitting the text instead would change how SentencePiece treats the whitespace at
        each cut."""
        model = self.sp if at_start else self._without_dummy_prefix
        offsets = {m.start() for m in template}
        byte_at = [0]
        for char in text:
            byte_at.append(byte_at[-1] + len(char.encode()))
        char_at = {b: i for i, b in enumerate(byte_at)}
        ids: list[int] = []
        for piece in model.encode(text, return_type="proto").pieces:
            start = char_at.get(piece.begin)
            if piece.id in self._control_and_user_defined and start is not None and start not in offsets:
                ids += self._literal_model.encode(text[start:char_at[piece.end]], out_type=int)
            else:
                ids.append(piece.id)
        return ids

    def _encode_continuation(self, text: str) -> list[int]:
        return list(self._without_dummy_prefix.encode(text, out_type=int))

    def _proto(self) -> Any:
        """A fresh, editable copy of this model's ``ModelProto``."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    @staticmethod
    def _processor(proto: Any) -> Any:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @cached_property
    def _literal_model(self) -> Any:
        """This model reading user-defined pieces as text (marked unused, which encoding never produces),
        without the dummy prefix."""
        proto = self._proto()
        for piece in proto.pieces:
            if piece.type == proto.SentencePiece.USER_DEFINED:
                piece.type = proto.SentencePiece.UNUSED
        proto.normalizer_spec.add_dummy_prefix = False
        return self._processor(proto)

    @cached_property
    def _without_dummy_prefix(self) -> Any:
        """This model with ``add_dummy_prefix`` off (the model itself if it is already off)."""
        proto = self._proto()
        if not proto.normalizer_spec.add_dummy_prefix:
            return self.sp
        proto.normalizer_spec.add_dummy_prefix = False
        return self._processor(proto)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = {self.bos_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    def apply_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.chat_format.render(messages, add_generation_prompt)

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, Path(folder) / "tokenizer.model")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "sha256": _sha256_files([self.path])}


class CharTokenizer(Tokenizer):
    """Character-level vocabulary (specials, newline, printable ASCII) for the CPU demo's tiny model:
    99 ids, no merges to learn, so a few-minute CPU run can still fit the task. Characters outside the
    vocabulary are an error rather than a silent replacement, so bad data surfaces in preprocessing."""

    kind = "char"
    SPECIALS = ("<pad>", "<bos>", "<eos>")
    DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self, chars: str = DEFAULT_CHARS, path: str | os.PathLike | None = None) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: duplicate characters in vocabulary")
        self.chars = chars
        self.path = None if path is None else Path(path)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.uses_bos = True
        self._id_of = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self._pieces = list(self.SPECIALS) + list(chars)
        self.vocab_size = len(self._pieces)

    def _encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in self._id_of)
            raise ValueError(f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at offset {pos} is not in "
                             f"the character vocabulary") from None

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        n_special = len(self.SPECIALS)
        return "".join(self._pieces[i] for i in map(int, ids) if not (skip_special and i < n_special))

    def apply_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return PLAIN_CHAT.render(messages, add_generation_prompt)

    def to_json(self) -> str:
        spec = {"type": "char", "version": 1, "specials": list(self.SPECIALS), "chars": self.chars}
        return json.dumps(spec)

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CHAR_TOKENIZER_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def from_file(cls, file: str | os.PathLike) -> CharTokenizer:
        try:
            spec = json.loads(Path(file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from err
        if spec.get("type") != "char" or list(spec.get("specials", [])) != list(cls.SPECIALS):
            raise ValueError(f"{file}: field 'type'/'specials': not a char tokenizer with specials "
                             f"{cls.SPECIALS}")
        if not isinstance(spec.get("chars"), str):
            raise ValueError(f"{file}: field 'chars': expected a string")
        return cls(spec["chars"], path=file)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": None if self.path is None else str(self.path),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "sha256": hashlib.sha256(self.to_json().encode()).hexdigest()}


def load_tokenizer(path_or_spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """Build a tokenizer from what is on disk.

    ``"char"`` → the default :class:`CharTokenizer`; a folder or file with ``char_tokenizer.json`` → char;
    a folder with ``tokenizer.json`` / ``tokenizer_config.json`` → Hugging Face; a ``.gguf`` file →
    Hugging Face via GGUF (needs ``gguf``); a ``.model`` file, or a folder holding only
    ``tokenizer.model`` → SentencePiece. A :class:`Tokenizer` instance is returned as is.
    """
    if isinstance(path_or_spec, Tokenizer):
        return path_or_spec
    if str(path_or_spec) == "char":
        return CharTokenizer()
    path = Path(path_or_spec)
    if path.is_dir():
        if (path / CHAR_TOKENIZER_FILE).is_file():
            return CharTokenizer.from_file(path / CHAR_TOKENIZER_FILE)
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        raise ValueError(f"{path}: no {CHAR_TOKENIZER_FILE}, tokenizer.json, tokenizer_config.json or "
                         "tokenizer.model in this folder")
    if path.is_file():
        if path.name == CHAR_TOKENIZER_FILE:
            return CharTokenizer.from_file(path)
        if path.suffix == ".gguf":
            return HFTokenizer(path.parent, gguf_file=path.name)
        if path.suffix == ".model" or ".model." in path.name:
            return SentencePieceTokenizer(path)
        raise ValueError(f"{path}: unrecognised tokenizer file (expected {CHAR_TOKENIZER_FILE}, *.model or "
                         "*.gguf)")
    raise FileNotFoundError(f"{path}: tokenizer path does not exist (or use the spec 'char')")
