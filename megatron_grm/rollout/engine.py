"""The rollout engine: batched sampling on the Megatron model, with per-token log-probabilities.

RFT samples N judgments per example, GRPO samples a group of G, voting samples k: all of them call
``RolloutEngine.generate(prompts, n, sampling)`` and get ``n`` samples per prompt, grouped by prompt.

The engine wraps the *same* GPTModel object the Trainer trains (``trainer.unwrapped``), so after an
optimizer step the next rollout samples from the new policy with no copy. When rollouts should run in
another parallel layout, pass the rollout model built by :func:`megatron_grm.rollout.refit.build_inference_model`
as ``model`` and the trainer's model as ``source_model``: every ``generate`` first refits (reshards) the
current training weights into it with Megatron-Core's ``swap_model_weights``.

Backends (see ``docs/rollout.md``): Megatron-Core's dynamic engine (paged KV cache, continuous
batching) on GPU with flash-attn; its static-batch controller (KV cache, one wave at a time) otherwise.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import torch

from megatron_grm.models.precision import fp8_suspended
from megatron_grm.parallel.inference_layout import sequence_parallel_off
from megatron_grm.rollout.controller import TokenizerShim
from megatron_grm.rollout.finish import finish, stop_text_decoder, stop_window, tail_has_stop
from megatron_grm.rollout.logprobs import training_logprobs
from megatron_grm.rollout.progress import RolloutProgress
from megatron_grm.rollout.sampling import Sample, SamplingConfig
from megatron_grm.rollout.streams import request_keys
from megatron_grm.rollout.waves import plan_waves

log = logging.getLogger(__name__)

BACKENDS = ("auto", "static", "dynamic")


class RolloutEngine:
    """Samples continuations of token-id prompts from a Megatron GPTModel.

    Collective over the model-parallel group: every TP (and PP) rank of a replica calls ``generate`` with
    the same prompts and settings; data-parallel replicas pass their own prompts and draw independently.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        end_ids: Sequence[int] | None = None,
        vocab_size: int | None = None,
        max_tokens_in_flight: int = 32768,
        max_batch_size: int = 256,
        backend: str = "auto",
        source_model: torch.nn.Module | None = None,
        debug_logprobs: bool = False,
        progress: bool = True,
    ) -> None:
        """
        Args:
            model: the GPTModel to sample from (a DDP-wrapped one is unwrapped; the weights are shared).
            tokenizer: a :class:`megatron_grm.data.tokenizer.Tokenizer`; gives text, end ids, stop strings
                and the real vocabulary size (padding rows of the embedding are never sampled).
            end_ids: the ids that end a sample (EOS, a chat template's turn-end token); defaults to the
                tokenizer's ``end_ids``. None without a tokenizer: samples end only at stop strings or length.
            vocab_size: real vocabulary size (ids >= it are never sampled); defaults to the tokenizer's.
            max_tokens_in_flight: cap on KV-cache positions held at once (memory bound; static: waves).
            max_batch_size: cap on sequences decoded together.
            backend: "auto" (dynamic on CUDA with flash-attn, else static), "static" or "dynamic" (on CUDA
                without flash-attn: its attention through torch, parallel/paged_attention.py).
            source_model: the training model when ``model`` is a separate rollout copy in another layout;
                its weights are refit into ``model`` before every generate.
            debug_logprobs: after every generate, recompute the sampled tokens' log-probabilities with a
                training forward and log the max abs difference (also in ``last_logprob_diff``).
            progress: show a progress bar (rank 0, only when a call takes more than ~2 s).
        """
        from megatron.core.utils import unwrap_model

        from megatron_grm.rollout.dynamic_backend import DynamicBackend, dynamic_unsupported
        from megatron_grm.rollout.static_backend import StaticBackend

        if backend not in BACKENDS:
            raise ValueError(f"rollout backend={backend!r}; choose one of {BACKENDS}")
        self.training_model = source_model if source_model is not None else model
        self.model = unwrap_model(model)
        self.source_model = source_model
        self.tokenizer = tokenizer
        if end_ids is None:
            end_ids = tokenizer.end_ids if tokenizer is not None else ()
        self.end_ids = tuple(int(t) for t in end_ids)
        self.vocab_limit = vocab_size if vocab_size is not None else (
            tokenizer.vocab_size if tokenizer is not None else None)
        if self.vocab_limit is not None and self.vocab_limit > self.model.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_limit} exceeds the model's {self.model.vocab_size} rows")
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_batch_size = max_batch_size
        self.debug_logprobs = debug_logprobs
        self.progress = progress
        self.last_logprob_diff: float | None = None

        pad_id = self.end_ids[0] if self.end_ids else 0
        shim = TokenizerShim(pad_id, getattr(tokenizer, "bos_id", None),
                             tokenizer.encode if tokenizer is not None else None)
        unsupported = (dynamic_unsupported(self.model, flash_attn_required=backend == "auto")
                       if backend in ("auto", "dynamic") else None)
        if backend == "auto":
            backend = "static" if unsupported else "dynamic"
            if unsupported and torch.cuda.is_available():
                log.info("rollout: Megatron-Core's dynamic engine not used: %s", unsupported)
        if backend == "dynamic":
            if unsupported:
                raise RuntimeError(f"rollout backend='dynamic' (Megatron-Core's dynamic engine): {unsupported}; "
                                   "use backend='static'")
            self.backend = DynamicBackend(self.model, shim, max_batch_size, max_tokens_in_flight, self.vocab_limit)
        else:
            self.backend = StaticBackend(self.model, shim, max_batch_size, self.vocab_limit)
        log.info("rollout backend: %s (Megatron-Core %s batching)", self.backend.name, self.backend.name)

    # ------------------------------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1,
                 sampling: SamplingConfig | None = None) -> list[Sample]:
        """``n`` samples per prompt, grouped: [p0s0, p0s1, ..., p1s0, ...]. Prompts are token ids and may
        differ in length. Each sample draws from its own stream (``rollout/streams.py``): the m-th sample
        of a prompt (its earlier copies in ``prompts`` counted) depends on the seed, the settings and that
        prompt only, not on the other prompts, their order, the wave caps or the parallel layout."""
        sampling = sampling or SamplingConfig()
        if n < 1:
            raise ValueError(f"n={n}; must be >= 1")
        prompts = [list(map(int, p)) for p in prompts]
        if self.source_model is not None:  # collective over every rank: before anything that may return early
            self.sync_weights()
        if not prompts:
            return []
        self._check_prompts(prompts, sampling)
        self._check_same_call_across_model_parallel(prompts, n, sampling)

        requests = [(i, j) for i in range(len(prompts)) for j in range(n)]
        keys = request_keys(sampling.seed, prompts, n)
        lengths = [len(prompts[i]) for i, _ in requests]
        if self.backend.name == "dynamic":
            waves = [sorted(range(len(requests)), key=lambda r: lengths[r])]
        else:
            waves = plan_waves(lengths, sampling.max_new_tokens, self.max_tokens_in_flight, self.max_batch_size)
            widest = max(lengths) + sampling.max_new_tokens
            if widest > self.max_tokens_in_flight:
                log.warning("a prompt of %d tokens + max_new_tokens=%d exceeds max_tokens_in_flight=%d; it runs "
                            "in a wave of its own", max(lengths), sampling.max_new_tokens, self.max_tokens_in_flight)

        end_ids = () if sampling.ignore_eos else self.end_ids
        stop_check = self._stop_check(sampling.stop)
        raw: list[tuple[list[int], list[float]] | None] = [None] * len(requests)
        was_training = self.model.training
        bar = RolloutProgress(len(requests), enabled=self.progress)
        try:
            # Decode steps of a few rows can run neither TE's FP8 GEMMs nor Megatron's sequence parallelism.
            with fp8_suspended(self.model), sequence_parallel_off(self.model):
                for wave in waves:
                    out = self.backend.generate_wave([prompts[requests[r][0]] for r in wave],
                                                     [keys[r] for r in wave], sampling, end_ids, stop_check,
                                                     bar.step)
                    for r, result in zip(wave, out):
                        raw[r] = result
        finally:
            bar.close()
            self.model.train(was_training)

        samples = [self._to_sample(prompts, i, j, raw[k], end_ids, sampling) for k, (i, j) in enumerate(requests)]
        if self.debug_logprobs:
            self.check_logprobs(samples)
        return samples

    def sync_weights(self) -> None:
        """Refit the training model's current weights into the rollout model (only with ``source_model``)."""
        if self.source_model is None:
            return
        from megatron_grm.rollout.refit import refit

        refit(self.source_model, self.model)

    def check_logprobs(self, samples: Sequence[Sample]) -> float:
        """Max abs difference between the samples' log-probabilities and a training forward on the same
        sequences (fp32 on CPU: ~1e-6). Logged on rank 0 and kept in ``last_logprob_diff``."""
        samples = [s for s in samples if s.token_ids]
        if not samples:
            self.last_logprob_diff = 0.0
            return 0.0
        recomputed = training_logprobs(self.training_model, [s.sequence for s in samples],
                                       [len(s.prompt_ids) for s in samples], self.max_tokens_in_flight)
        diff = max(
            float((torch.tensor(s.logprobs) - torch.tensor(r)).abs().max()) for s, r in zip(samples, recomputed)
        )
        self.last_logprob_diff = diff
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.info("rollout logprobs vs training forward: max |diff| = %.3g over %d tokens", diff,
                     sum(len(s.token_ids) for s in samples))
        return diff

    # ------------------------------------------------------------------------------------------ helpers
    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special=True)

    def _stop_check(self, stop: Sequence[str]):
        if not stop:
            return None
        if self.tokenizer is None:
            raise ValueError("sampling.stop needs a tokenizer (stop strings are matched on decoded text)")
        window = stop_window(stop)
        decode = stop_text_decoder(self.tokenizer)
        return lambda generated: tail_has_stop(generated[-window:], stop, decode)

    def _to_sample(self, prompts, i: int, j: int, raw, end_ids: Sequence[int], sampling: SamplingConfig) -> Sample:
        tokens, logprobs = raw
        decode = stop_text_decoder(self.tokenizer) if self.tokenizer is not None else None
        keep, reason = finish(tokens, end_ids, sampling.stop, decode)
        tokens, logprobs = tokens[:keep], logprobs[:keep]
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"prompt {i}: {len(tokens)} tokens but {len(logprobs)} log-probabilities")
        # The text leaves out the end id (a SentencePiece turn-end piece would otherwise read as text).
        ended = bool(tokens) and tokens[-1] in end_ids
        text = self._decode(tokens[:-1] if ended else tokens) if self.tokenizer is not None else None
        return Sample(prompt_index=i, sample_index=j, prompt_ids=list(prompts[i]), token_ids=tokens,
                      logprobs=logprobs, finish_reason=reason, text=text)

    @property
    def context_limit(self) -> int:
        """Positions a prompt and its continuation may fill together: the model's max_position_embeddings."""
        return int(self.model.max_sequence_length)

    def _check_prompts(self, prompts: list[list[int]], sampling: SamplingConfig) -> None:
        limit = self.context_limit
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
            if min(p) < 0 or max(p) >= self.model.vocab_size:
                raise ValueError(f"prompts[{i}] has a token id outside [0, {self.model.vocab_size})")
            if len(p) + sampling.max_new_tokens > limit:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens={sampling.max_new_tokens} exceed "
                                 f"the model's max_position_embeddings={limit}")

    def _check_same_call_across_model_parallel(self, prompts, n: int, sampling: SamplingConfig) -> None:
        """TP/PP ranks that disagree on the call would deadlock or decode garbage: fail loudly instead."""
        group = self._model_parallel_group()
        if group is None or torch.distributed.get_world_size(group) == 1:
            return
        digest = zlib.crc32(repr((prompts, n, sampling)).encode())
        pair = torch.tensor([digest, -digest], dtype=torch.int64, device=next(self.model.parameters()).device)
        torch.distributed.all_reduce(pair, op=torch.distributed.ReduceOp.MAX, group=group)
        if int(pair[0]) != digest or int(pair[1]) != -digest:
            raise RuntimeError("RolloutEngine.generate was called with different prompts or settings on the ranks "
                               "of one model-parallel group; every TP/PP rank must pass the same call")

    def _model_parallel_group(self):
        """The rollout model's own model-parallel group: a refit rollout model has its own."""
        if not torch.distributed.is_initialized():
            return None
        groups = getattr(self.model, "pg_collection", None)
        group = getattr(groups, "mp", None) if groups is not None else None
        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_model_parallel_group()
        return group
