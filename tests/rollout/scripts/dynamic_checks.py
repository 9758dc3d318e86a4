"""GPU only: Megatron-Core's dynamic engine (paged KV cache, continuous batching) through RolloutEngine.

The tiny model in bf16 (flash-attn has no fp32 kernels): the dynamic backend is the one that runs, its
samples have one log-probability per token, and those agree with a training forward and with the static
backend's greedy output to bf16 precision. Each request draws from its own stream, so reversing the
prompts or sampling on the static backend gives the same draws up to bf16 round-off. One prompt spans two
KV-cache pages. Without flash-attn the engine's attention runs through parallel/paged_attention.py.
Writes the outcomes to --out (rank 0).
"""

from __future__ import annotations

import argparse

from tests.report import write_on_rank0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.models.provider import build_model
    from megatron_grm.rollout import RolloutEngine, SamplingConfig
    from megatron_grm.stages.common import load_config, prepare_run

    run = prepare_run(load_config("sft", ["model=tiny", "precision=bf16", f"trainer.run_dir={args.run_dir}",
                                          "+model.init_method_std=0.2"]))
    model = build_model(run.model, run.parallel, run.precision)
    tok = load_tokenizer("char")
    from megatron.core.transformer import attention

    from megatron_grm.parallel import paged_attention
    from megatron_grm.rollout.dynamic_backend import BLOCK_SIZE_TOKENS

    long = "The quick brown fox jumps over the lazy dog. " * 6  # > one page of the paged KV cache
    prompts = [tok.encode(t, add_bos=True) for t in ["Hi", "What is 2+2? Answer:", "Tell me a story about", long]]
    assert len(prompts[-1]) > BLOCK_SIZE_TOKENS
    greedy = SamplingConfig(greedy=True, max_new_tokens=16)

    dynamic = RolloutEngine(model, tok, backend="dynamic", debug_logprobs=True)
    d = dynamic.generate(prompts, sampling=greedy)
    static = RolloutEngine(model, tok, backend="static")
    s = static.generate(prompts, sampling=greedy)
    sampled = dynamic.generate(prompts, n=4, sampling=SamplingConfig(max_new_tokens=16, seed=3))
    again = dynamic.generate(prompts, n=4, sampling=SamplingConfig(max_new_tokens=16, seed=3))
    # Per-request streams: the same draws with the prompts reversed, and on the static backend.
    reversed_ = dynamic.generate(prompts[::-1], n=4, sampling=SamplingConfig(max_new_tokens=16, seed=3))
    reversed_ = [x for i in range(len(prompts) - 1, -1, -1) for x in reversed_[4 * i:4 * i + 4]]
    static_sampled = static.generate(prompts, n=4, sampling=SamplingConfig(max_new_tokens=16, seed=3))

    def prefix_agreement(a, b, tokens: int) -> float:
        return sum(x.token_ids[:tokens] == y.token_ids[:tokens] for x, y in zip(a, b)) / len(a)

    # A second end id (a turn-end token) ends a request too, as Megatron's one-token stop word.
    k = max(range(len(d)), key=lambda i: len(d[i].token_ids))
    turn_end = d[k].token_ids[3]
    ended = RolloutEngine(model, tok, backend="dynamic", end_ids=(tok.eos_id, turn_end)).generate(
        prompts[k:k + 1], sampling=greedy)[0]
    # Evictions: a KV budget of one full-length sequence (max_tokens_in_flight=1) for 8 requests of 512 new
    # tokens runs out of blocks; each evicted request is re-queued by Megatron-Core without its stop words,
    # which keep_stop_words gives back (a stop string no sample writes keeps all 8 running to the end).
    crowded = RolloutEngine(model, tok, backend="dynamic", max_tokens_in_flight=1)
    long_run = crowded.generate(prompts[:2], n=4, sampling=SamplingConfig(max_new_tokens=512, seed=11,
                                                                          ignore_eos=True, stop=("~~~~~~~~",)))
    out = {
        "evictions": {"evicted": crowded.backend.last_evictions,
                      "restored": crowded.backend.last_stop_words_restored,
                      "lengths": [len(x.token_ids) for x in long_run],
                      "finish": [x.finish_reason for x in long_run]},
        "second_end_id": {"expected": d[k].token_ids[:d[k].token_ids.index(turn_end) + 1], "got": ended.token_ids,
                          "finish": ended.finish_reason, "n_logprobs": len(ended.logprobs)},
        "backend": dynamic.backend.name,
        "dynamic_greedy": [x.token_ids for x in d], "static_greedy": [x.token_ids for x in s],
        "lengths_match_logprobs": all(len(x.token_ids) == len(x.logprobs) for x in d + sampled),
        "debug_logprob_diff": dynamic.last_logprob_diff,
        "sampled_logprob_diff": dynamic.check_logprobs(sampled),
        "same_seed_equal": [x.token_ids for x in sampled] == [x.token_ids for x in again],
        "n_samples": len(sampled),
        "streams": {"reversed_first_token": prefix_agreement(sampled, reversed_, 1),
                    "reversed_first_4": prefix_agreement(sampled, reversed_, 4),
                    "static_first_token": prefix_agreement(sampled, static_sampled, 1),
                    "static_first_4": prefix_agreement(sampled, static_sampled, 4)},
        "attention": ("torch" if attention.Attention.flash_decode_and_prefill is paged_attention._decode_and_prefill
                      else "flash-attn"),
    }
    write_on_rank0(args.out, out)


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
