"""Megatron-Core's TextGenerationController with what a rollout needs added at its hooks.

Pinned to megatron-core 0.16.1 (the version ``parallel/cpu_compat.py`` is written for). The generation
loop, KV cache and sampling stay Megatron's; this subclass only overrides:

* ``sample_from_logits`` (static batching): also takes the log-probability of each drawn token from the
  same last-position logits, in fp32, under the plain softmax. Megatron's own ``return_log_probs`` would
  materialise the logits of *every prompt position* during prefill ([batch, prompt, vocab]: tens of GB
  for a 256k vocabulary), so it stays off and only [batch, vocab] exists per step.
* ``update_generation_status`` (static batching): Megatron counts a sequence's length *without* its
  terminating token, so EOS and its log-probability would be lost; here the token that ends a sample is
  counted. A sample also ends at ``max_new_tokens`` and when a stop string completes (early termination,
  the exact cut is made afterwards by :func:`megatron_grm.rollout.finish.finish`), and every step is
  reported to the progress bar.
* ``_torch_sampling_func`` (static batching) and ``_dynamic_step_sample_logits`` (dynamic batching): each
  row draws from its request's own random stream (:mod:`megatron_grm.rollout.streams`) instead of one
  generator shared by the batch, so a sample does not depend on its neighbours. Tokens the tokenizer does
  not have (the rows Megatron pads the vocabulary with) are never *drawn*. Log-probabilities still come
  from the unmasked logits, i.e. the plain softmax the training forward computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)

from megatron_grm.parallel.cpu_decode_kernel import argmax_logsumexp
from megatron_grm.rollout.streams import draw_tokens, stream_uniforms

StepCallback = Callable[[int, int], None]  # (tokens generated this step, samples finished this step)
StopCheck = Callable[[Sequence[int]], bool]  # generated tokens so far -> a stop string just completed?


class TokenizerShim:
    """What TextGenerationController reads from a tokenizer: ``eod`` (used to pad the batch), detokenize."""

    def __init__(self, pad_id: int, bos_id: int | None = None, encode: Callable[[str], list[int]] | None = None):
        self.eod = pad_id
        self.bos = bos_id
        self._encode = encode

    def detokenize(self, ids, **kwargs) -> str:
        return ""  # the engine decodes after cutting at EOS / stop strings

    def tokenize(self, text: str) -> list[int]:
        if self._encode is None:
            raise ValueError("this rollout engine has no tokenizer: prompts must be token ids")
        return self._encode(text)


class RolloutController(TextGenerationController):
    """See the module docstring; call :meth:`begin_wave` before each static batch."""

    def __init__(self, inference_wrapped_model, tokenizer: TokenizerShim, pp_group=None,
                 vocab_limit: int | None = None) -> None:
        super().__init__(inference_wrapped_model, tokenizer, pp_group)
        self.vocab_limit = vocab_limit
        self._prompt_lengths: list[int] = []
        self._end_ids = torch.zeros(0, dtype=torch.long)
        self._max_new_tokens = 0
        self._stop_check: StopCheck | None = None
        self._on_step: StepCallback | None = None
        self._step_logprobs: torch.Tensor | None = None
        self._greedy: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, their argmax) of this step
        self.logprobs = torch.zeros(0, 0)  # [rows, max_new_tokens] of the current wave
        self._keys = torch.zeros(0, dtype=torch.long)  # per row (static) or per request id (dynamic)
        self._drawn = torch.zeros(0, dtype=torch.long)  # static: tokens each row has generated so far
        self._request_prompt_lengths = torch.zeros(0, dtype=torch.long)  # dynamic: per request id

    def set_streams(self, keys: Sequence[int], prompt_lengths: Sequence[int]) -> None:
        """The random-stream key (``streams.request_keys``) and prompt length of each request, indexed by
        the request id the engine is given (dynamic batching; static waves pass them to begin_wave)."""
        self._keys = torch.tensor(list(keys), dtype=torch.long)
        self._request_prompt_lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)

    def begin_wave(self, prompt_lengths: Sequence[int], end_ids: Sequence[int], max_new_tokens: int,
                   keys: Sequence[int], stop_check: StopCheck | None = None,
                   on_step: StepCallback | None = None) -> None:
        if len(keys) != len(prompt_lengths):
            raise ValueError(f"{len(keys)} stream keys for a wave of {len(prompt_lengths)} rows")
        self._prompt_lengths = list(prompt_lengths)
        self._keys = torch.tensor(list(keys), dtype=torch.long)
        self._drawn = torch.zeros(len(keys), dtype=torch.long)
        self._end_ids = torch.tensor(list(end_ids), dtype=torch.long)
        self._max_new_tokens = max_new_tokens
        self._stop_check = stop_check
        self._on_step = on_step
        self.logprobs = torch.zeros(len(self._prompt_lengths), max_new_tokens, dtype=torch.float32)

    # -- static batching: log-probability of each drawn token ----------------------------------------
    def sample_from_logits(self, last_token_logits: torch.Tensor, sampling_params=None, vocab_size=None, **kwargs):
        # fp32 or bf16 CPU logits: every row's argmax and log-sum-exp in one C++ pass (the greedy token, and
        # any drawn token's log-probability: its logit minus the log-sum-exp), where argmax, log_softmax and
        # a gather took ~0.4 ms of a decode step of bench/rollout.py's 32 x 8,192 logits in fp32 (session 43)
        # and ~0.7 ms in bf16 (torch's bf16 argmax alone 0.55 ms, session 46).
        fused = argmax_logsumexp(last_token_logits)
        self._greedy = (last_token_logits, fused[0]) if fused is not None else None
        try:
            tokens = super().sample_from_logits(last_token_logits, sampling_params, vocab_size, **kwargs)
        finally:
            self._greedy = None
        index = tokens.view(-1, 1).long()
        if fused is not None:
            logp = last_token_logits.gather(-1, index).view(-1) - fused[1]
        else:
            logp = torch.log_softmax(last_token_logits.float(), dim=-1).gather(-1, index).view(-1)
        self._step_logprobs = logp.cpu()
        return tokens

    # -- static batching: end-of-sample bookkeeping ---------------------------------------------------
    def update_generation_status(
        self,
        updated_prompts_tokens: torch.Tensor,
        generation_started: torch.Tensor,
        current_context_end_position: int,
        is_generation_done_tensor: torch.Tensor,
        generated_sequence_lengths: torch.Tensor,
        termination_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        was_done = is_generation_done_tensor
        generating = generation_started & ~was_done
        rows = torch.nonzero(generating).flatten()
        self.logprobs[rows.cpu(), generated_sequence_lengths[rows].long().cpu()] = self._step_logprobs[rows.cpu()]
        generated_sequence_lengths = generated_sequence_lengths + generating  # the new token counts, always
        ends = generated_sequence_lengths >= self._max_new_tokens
        latest = updated_prompts_tokens[:, current_context_end_position]
        if len(self._end_ids):
            if self._end_ids.device != latest.device:  # once per wave, not a host-to-device copy per step
                self._end_ids = self._end_ids.to(latest.device)
            ends = ends | torch.isin(latest, self._end_ids)
        if self._stop_check is not None:
            for row in torch.nonzero(generating & ~ends).flatten().tolist():
                start = self._prompt_lengths[row]
                if self._stop_check(updated_prompts_tokens[row, start:current_context_end_position + 1].tolist()):
                    ends[row] = True
        done = was_done | (generating & ends)
        self._drawn = generated_sequence_lengths.long()  # the next draw of each row is its token number
        if self._on_step is not None:
            self._on_step(int(generating.sum()), int((done & ~was_done).sum()))
        return done, generated_sequence_lengths.int()

    # -- static batching: each row from its own stream ------------------------------------------------
    def _torch_sampling_func(self, last_token_logits: torch.Tensor, temperature: float, top_k: int,
                             top_p: float, vocab_size: int | None = None):
        rows = last_token_logits.size(0)
        if rows != len(self._keys):
            raise RuntimeError(f"static sampling of {rows} rows with {len(self._keys)} stream keys (begin_wave)")
        if self._keys.device != last_token_logits.device:  # once per wave, not a copy per step
            self._keys = self._keys.to(last_token_logits.device)
        return self._draw(last_token_logits, temperature, top_k, top_p, self._keys, self._drawn)

    # -- dynamic batching: each active request from its own stream ----------------------------------------
    def _dynamic_step_sample_logits(self, logits: torch.Tensor) -> None:
        if self._sampling_backend != "torch":
            raise RuntimeError(f"rollout sampling needs Megatron's torch sampler, not {self._sampling_backend!r}")
        context = self.inference_wrapped_model.inference_context
        if context.materialize_only_last_token_logits:
            last_token_logits = logits.squeeze(0)
        else:
            last_token_logits = context.last_token_logits(logits)
        active = slice(context.paused_request_count, context.total_request_count)
        ids = context.request_ids[active].long()
        if self._keys.device != ids.device:  # once per generate call, not a copy per step
            self._keys = self._keys.to(ids.device)
            self._request_prompt_lengths = self._request_prompt_lengths.to(ids.device)
        keys = self._keys[ids]
        # Tokens generated so far: the position being predicted minus the prompt (negative while a chunked
        # prefill is unfinished; that row's token is not kept).
        position = context.request_kv_length_offsets[active] + context.request_query_lengths[active]
        drawn = (position.long() - self._request_prompt_lengths[ids]).clamp_(min=0)
        tokens, rows = [], []
        for indices, temperature, top_k, top_p in self._torch_sampling_buckets:
            index = torch.tensor(indices, device=last_token_logits.device)
            tokens.append(self._draw(last_token_logits[index], temperature, top_k, top_p, keys[index], drawn[index]))
            rows.append(index)
        self._sampled_tokens_cuda[torch.cat(rows)] = torch.cat(tokens)

    def _draw(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, keys: torch.Tensor,
              drawn: torch.Tensor) -> torch.Tensor:
        """Rows' tokens from their streams; padding rows of the vocabulary are never drawn."""
        if self.vocab_limit is not None and self.vocab_limit < logits.size(-1):
            logits = logits.clone()
            logits[..., self.vocab_limit:] = float("-inf")
        if top_k == 1:  # greedy: nothing to draw
            if self._greedy is not None and self._greedy[0] is logits:  # sample_from_logits found it already
                return self._greedy[1]
            return logits.argmax(dim=-1)
        return draw_tokens(logits, temperature, top_k, top_p, stream_uniforms(keys, drawn.to(keys.device)))
