"""The rollout engine: batched sampling with per-token log-probabilities on the Megatron model.

    engine = RolloutEngine(trainer.unwrapped, tokenizer)
    samples = engine.generate(prompt_ids, n=4, sampling=SamplingConfig(temperature=1.0, max_new_tokens=512))

See ``docs/rollout.md`` for the backends, the log-probability convention and the benchmark. The engine
imports Megatron-Core lazily, so ``SamplingConfig`` and ``Sample`` are cheap to import.
"""

from megatron_grm.rollout.sampling import Sample, SamplingConfig

__all__ = ["RolloutEngine", "Sample", "SamplingConfig", "training_logprobs"]


def __getattr__(name: str):
    if name == "RolloutEngine":
        from megatron_grm.rollout.engine import RolloutEngine

        return RolloutEngine
    if name == "training_logprobs":
        from megatron_grm.rollout.logprobs import training_logprobs

        return training_logprobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
