"""Pure parts of the rollout engine: sampling settings, where a sample ends, and the wave plan."""

from __future__ import annotations

import random

import pytest

from megatron_grm.rollout.finish import finish, first_stop_end, stop_window, tail_has_stop
from megatron_grm.rollout.sampling import Sample, SamplingConfig
from megatron_grm.rollout.waves import plan_waves, wave_tokens


def chars(ids):
    """A decode where token i is the character chr(i) (every token exactly one character)."""
    return "".join(chr(i) for i in ids)


def codes(text: str) -> list[int]:
    return [ord(c) for c in text]


# ------------------------------------------------------------------------------------------ SamplingConfig
@pytest.mark.parametrize("kwargs, field", [
    ({"top_k": 5, "top_p": 0.9}, "top_k"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ("",)}, "stop"),
])
def test_invalid_sampling_settings_are_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**kwargs)


def test_greedy_ignores_temperature_and_maps_to_megatron_argmax():
    cfg = SamplingConfig(greedy=True, temperature=0.0, top_k=5, top_p=0.5)
    params = cfg.megatron_params()
    assert (params.top_k, params.top_p, params.temperature) == (1, 0.0, 1.0)
    assert params.return_log_probs is True


def test_top_p_one_means_off_and_settings_pass_through():
    params = SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=9).megatron_params()
    assert (params.top_k, params.top_p, params.temperature, params.num_tokens_to_generate) == (0, 0.0, 0.7, 9)
    params = SamplingConfig(top_p=0.9).megatron_params()
    assert params.top_p == pytest.approx(0.9)


def test_a_single_stop_string_becomes_a_tuple():
    assert SamplingConfig(stop="}").stop == ("}",)


def test_sample_sequence_and_logprob_sum():
    s = Sample(0, 1, [1, 2], [3, 4], [-0.5, -0.25], "length")
    assert s.sequence == [1, 2, 3, 4]
    assert s.logprob_sum == pytest.approx(-0.75)


# ------------------------------------------------------------------------------------------ finish
def test_eos_cuts_after_its_first_occurrence():
    assert finish([5, 6, 2, 7, 2], end_ids=(2,), stop=(), decode=None) == (3, "stop")


def test_the_first_of_several_end_ids_ends_the_sample():
    # Gemma-2-it: EOS and <end_of_turn> both end a turn, whichever comes first.
    assert finish([5, 107, 6, 1], end_ids=(1, 107), stop=(), decode=None) == (2, "stop")
    assert finish([5, 6, 1, 107], end_ids=(1, 107), stop=(), decode=None) == (3, "stop")


def test_no_eos_and_no_stop_means_length():
    assert finish([5, 6, 7], end_ids=(2,), stop=(), decode=None) == (3, "length")
    assert finish([5, 6, 7], end_ids=(), stop=("zz",), decode=chars) == (3, "length")


def test_stop_string_spanning_tokens_is_kept_whole():
    ids = codes("Scores: \\boxed{3, 7} trailing")
    keep, reason = finish(ids, end_ids=(), stop=("}",), decode=chars)
    assert (chars(ids[:keep]), reason) == ("Scores: \\boxed{3, 7}", "stop")
    keep, _ = finish(ids, end_ids=(), stop=("7} t", "xyz"), decode=chars)
    assert chars(ids[:keep]) == "Scores: \\boxed{3, 7} t"


def test_earliest_of_eos_and_stop_wins():
    ids = codes("ab") + [2] + codes("cd")
    assert finish(ids, end_ids=(2,), stop=("c",), decode=chars) == (3, "stop")
    ids = codes("abcd") + [2]
    assert finish(ids, end_ids=(2,), stop=("bc",), decode=chars) == (3, "stop")


def test_stop_inside_a_multi_character_token():
    pieces = {1: "Hel", 2: "lo wor", 3: "ld!"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert first_stop_end([1, 2, 3], ("o w",), decode) == 2
    assert first_stop_end([1, 2, 3], ("d!",), decode) == 3
    assert first_stop_end([1, 2, 3], ("xyz",), decode) is None


def test_binary_search_agrees_with_a_linear_scan():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice(codes("abc")) for _ in range(rng.randint(1, 30))]
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))]
        linear = next((k for k in range(1, len(ids) + 1) if stop[0] in chars(ids[:k])), None)
        assert first_stop_end(ids, stop, chars) == linear


def test_tail_window_sees_a_stop_string_that_just_completed():
    ids = codes("x" * 50 + "END")
    window = stop_window(("END",))
    assert window >= len("END")
    assert tail_has_stop(ids[-window:], ("END",), chars)
    assert not tail_has_stop(ids[-window:-1], ("END",), chars)


# ------------------------------------------------------------------------------------------ waves
def test_waves_cover_every_request_once_and_respect_both_caps():
    rng = random.Random(1)
    lengths = [rng.randint(1, 60) for _ in range(101)]
    waves = plan_waves(lengths, max_new_tokens=16, max_tokens_in_flight=400, max_batch_size=6)
    assert sorted(i for w in waves for i in w) == list(range(101))
    for w in waves:
        assert len(w) <= 6
        assert wave_tokens(lengths, w, 16) <= 400
    flat = [lengths[i] for w in waves for i in w]
    assert flat == sorted(flat)  # shortest prompts first, alike prompts together


def test_a_request_wider_than_the_cap_runs_alone():
    waves = plan_waves([5, 500, 6], max_new_tokens=10, max_tokens_in_flight=100, max_batch_size=8)
    assert waves == [[0, 2], [1]]


def test_one_wave_when_everything_fits():
    assert plan_waves([3, 1, 2], 4, 10_000, 8) == [[1, 2, 0]]
    with pytest.raises(ValueError):
        plan_waves([3], 4, 0, 8)


def test_a_stop_string_that_is_a_special_token_ends_the_sample(smollm2_tokenizer_dir):
    # Matched on text with the specials skipped, "<|im_end|>" never matched: the static engine ran to
    # max_new_tokens, and a sample the dynamic engine stopped there was reported as 'length'.
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.rollout.finish import stop_text_decoder

    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    ids = tokenizer.encode("Scores: \\boxed{3, 7}<|im_end|>\nmore text")
    end = ids.index(tokenizer.encode("<|im_end|>")[0]) + 1
    assert finish(ids, (), ("<|im_end|>",), stop_text_decoder(tokenizer)) == (end, "stop")
    assert tail_has_stop(ids[:end], ("<|im_end|>",), stop_text_decoder(tokenizer))
    skipped = lambda t: tokenizer.decode(list(t), skip_special=True)  # noqa: E731  what the engine used before
    assert finish(ids, (), ("<|im_end|>",), skipped)[1] == "length"
