"""Rollout throughput: our engine (Megatron-Core inference) vs. ``transformers`` ``generate``, same model.

A random-init Llama is built in Hugging Face, its weights are converted into our Megatron GPTModel in
process (megatron_grm.models.hf_convert, the project's HF<->Megatron weight map), and both generate
greedily from the same prompts (mixed lengths, EOS ignored so every row makes ``--new-tokens``). The
script checks that the generated tokens are identical or, where they part, that our token is the argmax of
``transformers``' own forward up to round-off (``greedy_shortfall``), and prints tokens/s for batch 1 and batch 32 and
the ratio ours / HF. ``--copies 1 8`` (the default) also runs batch 32 as 4 prompts x 8 samples:
identical prompts, which our engine prefills once and ``generate`` prefills per row. ``--responses R``
shapes the prompts as the stages' are: a head (instructions and conversation) and R response blocks, which
each of a prompt's copies shows in its own random order, so an example's rows are alike only where their
orders agree (with R = 2, two distinct rows per example). ``--temperature T``
samples instead (both sides over the whole vocabulary at temperature T: ``generate`` with
``torch.multinomial``, ours from per-request streams); sampled tokens cannot be compared, so that check
is skipped.

    .venv/bin/python bench/rollout.py                       # CPU figures: docs/rollout.md, docs/rollout_benchmarks.md
    .venv/bin/python bench/rollout.py --hidden 1024 --layers 8 --batches 1 8 32
    .venv/bin/python bench/rollout.py --batches 32 --min-prompt 960 --max-prompt 1200  # GRM-length prompts
    .venv/bin/python bench/rollout.py --batches 32 --copies 8 --responses 2 --min-prompt 960 --max-prompt 1200 \
        --new-tokens 256 --temperature 1.0   # as RFT / GRPO / voting@8 sample pairwise examples

The sides alternate (who goes first rotates every repeat) so drifting load hits them alike; HF runs with
the Megatron CPU compatibility layer's global torch-function mode disabled, as it would in a process of its
own. ``generate`` runs with each of ``--hf-cache`` (its default dynamic cache, which grows by concatenation,
and its preallocated static cache), and the faster of them per case is the baseline (named in the table).
"paired median" is the median over repeats of the paired ratio of CPU seconds. The roofline columns
(``bench/roofline.py``; the matmul peak and read bandwidth measured in this run) give the least wall time
any engine could take at those rates, the share of ours that is, and ``generate``'s time over it: the
largest ours/HF ratio reachable. A second table splits each side's time into prefill (one more run that
stops at the prefill's token) and decode (the rest), each against its part of the floor; a third splits
our median decode forward into the C++ attention kernel, the GEMMs (oneDNN, C++ GEMM, AMX GEMM) and the rest
(one more run, with those functions clocked).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import matmul_peak, read_bandwidth, read_probe_name, rollout_floor  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 8],
                    help="samples per distinct prompt (a batch of 32 with 8 copies: 4 prompts x 8 samples, as "
                         "in voting@8 or RFT's N judgments); HF generates the repeated rows, as "
                         "num_return_sequences does, ours gets the distinct prompts with n=copies (with "
                         "--responses, every row, as the stages pass their shuffled prompts)")
    ap.add_argument("--responses", type=int, default=0,
                    help="GRM-shaped prompts: each distinct prompt is a shared head followed by this many response "
                         "blocks, and each of its --copies rows shows the blocks in its own random order, as "
                         "RFT, GRPO and voting shuffle them (0: plain random prompts)")
    ap.add_argument("--response-share", type=float, default=0.75,
                    help="with --responses: the share of a prompt's tokens in its response blocks (RMB's "
                         "conversations vs. responses: 0.74 pairwise, 0.83 best-of-N, by characters)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="both sides' weights and activations (bf16: the same bf16-rounded weights on both sides)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy, compared token by token (default); > 0: both sides sample at it")
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=48)
    ap.add_argument("--equal-lengths", action="store_true",
                    help="every prompt --max-prompt tokens (isolates the per-step cost from the static engine's "
                         "one-position-per-step handling of mixed prompt lengths)")
    ap.add_argument("--hf-cache", nargs="+", choices=("dynamic", "static"), default=["dynamic", "static"],
                    help="generate's KV caches to time; the faster per case is the baseline")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch (the best is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whole-final-layer", action="store_true",
                    help="our prefill runs its final layer at every position (rollout/last_position.py off), "
                         "as before session 39")
    args = ap.parse_args()
    if args.responses and (args.responses < 2 or not 0 < args.response_share < 1
                           or round(args.min_prompt * args.response_share) < args.responses):
        ap.error("--responses needs at least 2 blocks, --response-share in (0, 1), and at least one token per "
                 "block in the shortest prompt")
    return args


def hf_llama(args: argparse.Namespace):
    import transformers as tf

    torch.manual_seed(args.seed)
    config = tf.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=args.max_prompt + args.new_tokens + 8, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.1,  # peaked logits: greedy is not decided by round-off
    )
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def make_prompts(args: argparse.Namespace, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed + count)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (count,), generator=g).tolist()
    if args.equal_lengths:
        lengths = [args.max_prompt] * count
    return [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]


def shown_rows(args: argparse.Namespace, prompts: list[list[int]], copies: int) -> list[list[int]]:
    """Every row of a case: each distinct prompt ``copies`` times, or, with ``--responses R``, as a head
    and R response blocks shown in a random order per row (a row's own shuffle, as the stages draw them)."""
    if not args.responses:
        return [p for p in prompts for _ in range(copies)]
    rows = []
    for i, prompt in enumerate(prompts):
        head = len(prompt) - round(len(prompt) * args.response_share)
        bounds = [head + (len(prompt) - head) * k // args.responses for k in range(args.responses + 1)]
        blocks = [prompt[a:b] for a, b in zip(bounds, bounds[1:])]
        orders = random.Random(f"{args.seed}:{i}")
        for _ in range(copies):
            order = list(range(len(blocks)))
            orders.shuffle(order)
            rows.append(prompt[:head] + [t for b in order for t in blocks[b]])
    return rows


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, temperature: float = 0.0,
                cache: str = "dynamic") -> list[list[int]]:
    """transformers generate, greedy or sampled at ``temperature`` (no top-k / top-p); left padding with an
    attention mask for mixed prompt lengths; ``cache``: its KV-cache implementation."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
        do_sample=False)
    if cache != "dynamic":
        sampling["cache_implementation"] = cache
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0, **sampling)
    return out[:, width:].tolist()


@torch.inference_mode()
def greedy_shortfall(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """Where our greedy continuation first parts from ``generate``'s, how far our token's logit falls
    below the best one in ``transformers``' own forward of the shared prefix. Zero means ours is that
    forward's argmax (``generate`` took the other side of the fork); a round-off-sized value is a
    near-tie that fp32 summation order decides (left padding shifts a row's RoPE positions, which moves
    log-probabilities by ~1e-3 at 1,000-token positions on this random model); more is a wrong token."""
    t = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    logits = model(input_ids=torch.tensor([prompt + ours[:t]])).logits[0, -1].float()
    return float(logits.max() - logits[ours[t]])


# fp32: summation order. bf16: transformers' own bf16 forward of this model is up to 1.05 logits from its
# fp32 forward at 1,000-token prompts (session 26), so a bf16 side's best token may sit up to twice that
# below the fp32 forward's best. (With RoPE's inv_freq rounded to bf16, HF's tokens fell up to 5.6 below.)
TIE_TOLERANCE = {"fp32": 1e-2, "bf16": 2.1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result). CPU seconds are what the work costs on a machine
    shared with other jobs, where wall time mostly measures the neighbours."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


@contextlib.contextmanager
def decode_step_timer(model: torch.nn.Module):
    """Yields a list that gets, per forward of ``model`` in the block, (wall seconds, seconds inside the C++
    decode attention, seconds inside the GEMMs: oneDNN's, the C++ GEMM and the AMX one): the functions are wrapped
    with a clock for the block and restored after it. A CPU decode forward then splits into attention,
    linears and the rest (norms, RoPE, SwiGLU, cache writes and Megatron's Python); the controller's sampling
    between forwards is in none of them. On the CPU every call is synchronous, so the clocks are the work's."""
    from megatron_grm.parallel import cpu_decode_kernel, onednn_linear

    inside = {"attention": 0.0, "linears": 0.0}
    wrapped = [(cpu_decode_kernel, "attend", "attention"), (onednn_linear, "linear", "linears"),
               (cpu_decode_kernel, "packed_linear", "linears"), (cpu_decode_kernel, "amx_linear", "linears")]
    originals = [getattr(module, name) for module, name, _ in wrapped]

    def clocked(function, key):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                inside[key] += time.perf_counter() - start
        return call

    steps: list[tuple[float, float, float]] = []
    began: dict[str, float] = {}

    def before(*_) -> None:
        began.update(inside, wall=time.perf_counter())

    def after(*_) -> None:
        steps.append((time.perf_counter() - began["wall"], inside["attention"] - began["attention"],
                      inside["linears"] - began["linears"]))

    for (module, name, key), function in zip(wrapped, originals):
        setattr(module, name, clocked(function, key))
    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield steps
    finally:
        for hook in hooks:
            hook.remove()
        for (module, name, _), function in zip(wrapped, originals):
            setattr(module, name, function)


def main() -> None:
    args = parse_args()
    load = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(b, c) for b in args.batches for c in args.copies if c <= b and b % c == 0]
    prompts = {(b, c): make_prompts(args, b // c) for b, c in cases}  # the distinct prompts
    hf = hf_llama(args)

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])

        from megatron_grm.models.hf_convert import fill_model_from_hf, open_hf
        from megatron_grm.models.precision import PrecisionConfig
        from megatron_grm.models.provider import build_model
        from megatron_grm.parallel import ParallelLayout, destroy_parallel, init_parallel
        from megatron_grm.rollout import RolloutEngine, SamplingConfig

        layout = ParallelLayout()
        init_parallel(layout, seed=args.seed)
        src = open_hf(folder)
        model = build_model(src.cfg, layout, PrecisionConfig(args.dtype))
        fill_model_from_hf(model, src)
        reference = hf  # fp32: greedy ties are judged on the fp32 forward, whatever the sides' dtype
        if args.dtype != "fp32":  # loaded as a user would: `.to(bf16)` would round RoPE's inv_freq too
            import transformers as tf

            hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype],
                                                         attn_implementation="sdpa").eval()

    engine = RolloutEngine(model, end_ids=(2,), vocab_size=args.vocab, max_tokens_in_flight=1 << 20, progress=False)
    engine.backend.final_layer_last_position = not args.whole_final_layer
    sampled = args.temperature > 0
    how = f"sampled at temperature {args.temperature}" if sampled else "greedy"
    sampling = SamplingConfig(greedy=not sampled, temperature=args.temperature if sampled else 1.0,
                              max_new_tokens=args.new_tokens, ignore_eos=True, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    shape = (f"; {args.responses} response blocks ({args.response_share:.0%} of each prompt) in a random order per "
             f"row" if args.responses else "")
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, "
          f"ffn {args.ffn}, vocab {args.vocab} ({params / 1e6:.1f}M params, {args.dtype}); prompts "
          f"{args.max_prompt if args.equal_lengths else f'{args.min_prompt}-{args.max_prompt}'} tokens, "
          f"{args.new_tokens} new tokens, {how}{shape}; torch threads {torch.get_num_threads()}; "
          f"{args.repeats} alternating timed runs per side after a warm-up (best reported)")

    from megatron_grm.parallel.cpu_compat import without_cpu_compat

    rows_of = {case: shown_rows(args, prompts[case], case[1]) for case in cases}

    def run_hf(case: tuple[int, int], cache: str, new_tokens: int = args.new_tokens):
        with without_cpu_compat():
            return hf_generate(hf, rows_of[case], new_tokens, args.temperature, cache)

    def run_ours(case: tuple[int, int], new_tokens: int = args.new_tokens):
        how = dataclasses.replace(sampling, max_new_tokens=new_tokens)
        if args.responses:  # every row as the stages pass them: shuffled orders, some alike
            return [s.token_ids for s in engine.generate(rows_of[case], n=1, sampling=how)]
        return [s.token_ids for s in engine.generate(prompts[case], n=case[1], sampling=how)]

    def machine_rates() -> tuple[float, float]:
        # A bf16 model's GEMMs may run in fp32 on its bf16 values (exact products, fp32 sums: what a CPU
        # without a bf16 GEMM does, parallel/onednn_linear.py), so the faster of the two rates bounds them.
        with without_cpu_compat():
            peak = max(matmul_peak(src.cfg, DTYPES[args.dtype]), matmul_peak(src.cfg, torch.float32))
            return peak, read_bandwidth()

    rates = [machine_rates()]
    rows = []
    for case in cases:
        sides = {f"hf-{cache}": (lambda c=case, k=cache: run_hf(c, k)) for cache in args.hf_cache}
        sides["ours"] = lambda c=case: run_ours(c)
        outputs = {name: fn() for name, fn in sides.items()}  # warm-up; also the tokens compared below
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        names = list(sides)
        for r in range(args.repeats):  # rotate who goes first, so drifting load hits every side alike
            for name in names[r % len(names):] + names[:r % len(names)]:
                wall, cpu, _ = timed(sides[name])
                times[name].append((wall, cpu))
        for name, rows_out in outputs.items():
            if any(len(tokens) != args.new_tokens for tokens in rows_out):
                raise SystemExit(f"{name}: a row did not generate --new-tokens={args.new_tokens} tokens")
        for name in names[:-1]:
            print(f"batch {case[0]} copies {case[1]}: {name} best {min(t[0] for t in times[name]):.2f} s wall, "
                  f"{min(t[1] for t in times[name]):.2f} CPU-s")
        best = min(names[:-1], key=lambda name: min(t[1] for t in times[name]))  # HF's faster cache here
        # One run of each side that stops after the prefill's token: its wall time splits the rollout's
        # into prefill and decode, each set against its own floor below.
        prefill = {"hf": timed(lambda c=case, k=best[3:]: run_hf(c, k, 1))[0],
                   "ours": timed(lambda c=case: run_ours(c, 1))[0]}
        # And one more of ours with its decode steps clocked (the last new_tokens - 1 forwards; a shared
        # prefill runs a forward per segment before them).
        with decode_step_timer(model) as forwards:
            clocked_wall = timed(lambda c=case: run_ours(c))[0]
        steps = forwards[-(args.new_tokens - 1):] if args.new_tokens > 1 else []
        if steps:  # medians of (forward, attention, linears), and the time between forwards per step
            between = (clocked_wall - sum(forward[0] for forward in forwards)) / len(steps)
            prefill["steps"] = [*(statistics.median(step[i] for step in steps) for i in range(3)), between]
        else:
            prefill["steps"] = None
        times["hf"], outputs["hf"] = times[best], outputs[best]
        same = sum(a == h for a, h in zip(outputs["ours"], outputs["hf"]))
        row_prompts = rows_of[case]
        shortfalls = []
        if not sampled:
            with without_cpu_compat():
                shortfalls = [greedy_shortfall(reference, p, a, h)
                              for p, a, h in zip(row_prompts, outputs["ours"], outputs["hf"]) if a != h]
        paired = sorted(h[1] / o[1] for h, o in zip(times["hf"], times["ours"]))
        rows.append((case, times, same, paired[len(paired) // 2], shortfalls, best, prefill))

    rates.append(machine_rates())
    peak, bandwidth = max(r[0] for r in rates), max(r[1] for r in rates)  # the higher: the lower floor
    print(f"load average at start: {load:.1f}, now {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"roofline (measured in this run, best of before and after the cases): matmul peak {peak / 1e9:.0f} "
          f"GFLOP/s ({'fp32' if args.dtype == 'fp32' else f'the faster of {args.dtype} and fp32'}, the prefill's "
          f"GEMM shapes), read bandwidth {bandwidth / 1e9:.1f} GB/s ({read_probe_name()}); "
          f"floor = the least wall time any engine could take at these rates (bench/roofline.py), HF/floor = "
          f"the largest ours/HF ratio reachable")
    print(f"{'batch':>5}  {'copies':>6}  {'HF cache':>9}  {'HF tok/s':>9}  {'ours tok/s':>10}  {'ours/HF':>7}  "
          f"{'HF tok/CPU-s':>12}  {'ours tok/CPU-s':>14}  {'ours/HF':>7}  {'paired median':>13}  {'floor s':>7}  "
          f"{'floor/ours':>10}  {'HF/floor':>8}  same greedy tokens")
    all_same = True
    splits = []
    for (b, copies), times, same, median, shortfalls, best, prefill in rows:
        hf_wall, hf_cpu = (min(t[i] for t in times["hf"]) for i in (0, 1))
        wall, cpu = (min(t[i] for t in times["ours"]) for i in (0, 1))
        all_same &= all(gap <= TIE_TOLERANCE[args.dtype] for gap in shortfalls)
        ties = f" (others: our token within {max(shortfalls):.1e} of the best logit)" if shortfalls else ""
        n = b * args.new_tokens
        bound = rollout_floor(src.cfg, rows_of[(b, copies)], args.new_tokens, DTYPES[args.dtype].itemsize, peak,
                              bandwidth)
        floor = bound.total_s
        splits.append((b, copies, bound, prefill, {"hf": hf_wall - prefill["hf"], "ours": wall - prefill["ours"]}))
        agree = "n/a (sampled)" if sampled else f"{same}/{b}{ties}"
        print(f"{b:>5}  {copies:>6}  {best[3:]:>9}  {n / hf_wall:>9.1f}  {n / wall:>10.1f}  {hf_wall / wall:>7.2f}  "
              f"{n / hf_cpu:>12.1f}  {n / cpu:>14.1f}  {hf_cpu / cpu:>7.2f}  {median:>13.2f}  {floor:>7.2f}  "
              f"{floor / wall:>10.0%}  {hf_wall / floor:>8.2f}  {agree}")
    print("where the time goes: each side's prefill timed once more alone (a run to the prefill's token); its "
          "decode = its best rollout minus that; every part as seconds and the floor's share of them")
    print(f"{'batch':>5}  {'copies':>6}  {'prefill floor':>13}  {'ours':>12}  {'HF':>12}  {'decode floor':>12}  "
          f"{'ours':>12}  {'HF':>12}  decode steps bandwidth-bound")

    def part(seconds: float, least: float) -> str:
        return f"{seconds:.2f} ({least / seconds:.0%})" if seconds > 0 else "n/a"

    for b, copies, bound, prefill, decode in splits:
        print(f"{b:>5}  {copies:>6}  {bound.prefill_s:>13.2f}  {part(prefill['ours'], bound.prefill_s):>12}  "
              f"{part(prefill['hf'], bound.prefill_s):>12}  {bound.decode_s:>12.2f}  "
              f"{part(decode['ours'], bound.decode_s):>12}  {part(decode['hf'], bound.decode_s):>12}  "
              f"{bound.decode_bandwidth_bound_steps}/{args.new_tokens - 1}")
    print("our decode forward (one more rollout, every forward clocked; medians over its steps, ms): the C++ "
          "attention kernel, the GEMMs (oneDNN, C++ GEMM, AMX GEMM) and the rest (norms, RoPE, SwiGLU, cache writes, "
          "Megatron's Python; sampling between forwards is not in it); between: the run's time outside forwards "
          "per step (the controller: sampling, log-probabilities, stop checks)")
    print(f"{'batch':>5}  {'copies':>6}  {'forward':>7}  {'attention':>9}  {'linears':>7}  {'rest':>6}  {'between':>7}")
    for b, copies, _, prefill, _ in splits:
        if prefill["steps"] is None:
            continue
        step, attention, linears, between = (1e3 * t for t in prefill["steps"])
        shown = f"{attention:>9.1f}" if attention > 0 else f"{'torch':>9}"  # the kernel did not run: in the rest
        print(f"{b:>5}  {copies:>6}  {step:>7.1f}  {shown}  {linears:>7.1f}  {step - attention - linears:>6.1f}  "
              f"{between:>7.1f}")
    destroy_parallel()
    if not all_same:
        raise SystemExit(f"greedy outputs differ between transformers and the rollout engine beyond near-ties "
                         f"(our token's logit more than {TIE_TOLERANCE[args.dtype]} below the best where they part)")


if __name__ == "__main__":
    main()
