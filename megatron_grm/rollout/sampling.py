"""How to sample, and what one sample is.

The log-probabilities a rollout reports are always those of the model's *plain* softmax (temperature 1,
no top-k / top-p, over the whole padded vocabulary): the quantity the training forward computes
(``-model(tokens, ..., labels=...)``) and the one the GRPO importance ratio and KL term need. Temperature,
top-k and top-p only shape the distribution the tokens are *drawn* from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings for one ``RolloutEngine.generate`` call.

    ``greedy`` takes the argmax (temperature, top-k, top-p are then ignored). ``top_k`` = 0 and
    ``top_p`` = 1.0 mean "off"; Megatron-Core's sampler applies one of the two, never both, so setting
    both is an error here rather than a silent choice there. ``stop`` strings end a sample once its
    decoded text contains one (the string is kept, like EOS); they need a tokenizer. ``ignore_eos``
    generates past EOS and every other end id (benchmarks). ``seed`` keys every sample's own random stream
    (``rollout/streams.py``): the same prompt, settings and seed give the same samples, whatever else is in
    the call and on whichever data-parallel rank.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens}; must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"sampling.temperature={self.temperature}; must be > 0 (use greedy=True for argmax)")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k}; must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p}; must be in (0, 1] (1.0 = off)")
        if not self.greedy and self.top_k > 0 and self.top_p < 1.0:
            raise ValueError(
                f"sampling.top_k={self.top_k} and sampling.top_p={self.top_p}: Megatron-Core's sampler applies "
                "either top-k or top-p, not both; set one of them off"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop: empty stop strings are not allowed")

    def megatron_params(self):
        """The equivalent ``megatron.core.inference.sampling_params.SamplingParams`` (logprobs on)."""
        from megatron.core.inference.sampling_params import SamplingParams

        if self.greedy:
            top_k, top_p, temperature = 1, 0.0, 1.0
        else:
            top_k, top_p, temperature = self.top_k, (0.0 if self.top_p >= 1.0 else self.top_p), self.temperature
        return SamplingParams(
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            return_log_probs=True,
            skip_prompt_log_probs=True,
            num_tokens_to_generate=self.max_new_tokens,
        )


@dataclass
class Sample:
    """One generated continuation of one prompt.

    ``token_ids`` are the generated tokens only (the EOS token or the tokens completing a stop string are
    included, so training on ``prompt_ids + token_ids`` teaches the model to stop); ``logprobs[t]`` is
    log p(token_ids[t] | prompt, token_ids[:t]) under the plain softmax (see the module docstring).
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached); see also
    # rollout.judgments.PROMPT_TOO_LONG, a judgment that was never generated
    text: str | None = None

    @property
    def sequence(self) -> list[int]:
        """Prompt and continuation, the row a training batch is built from."""
        return self.prompt_ids + self.token_ids

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))
