"""How a GRPO rollout becomes update rows: padding to U equal sets of micro-batches after zero-variance
filtering, rows that outgrow ``trainer.seq_length``, and examples whose prompt leaves no room to judge."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_grm.data.examples import Example, Turn
from megatron_grm.data.tokenizer import load_tokenizer
from megatron_grm.rollout.judgments import PROMPT_TOO_LONG, JudgmentSample, prompt_length, split_by_prompt_room
from megatron_grm.stages.grpo import (
    GRPOSettings,
    _split_steps,
    fit_rows,
    fitting_examples,
    padded_rows,
    rows_by_update,
    validation_due,
)


@pytest.mark.parametrize(("rows", "mbs", "updates", "expected"),
                         [(16, 2, 1, 16), (6, 2, 2, 8), (3, 2, 1, 4), (5, 1, 4, 8), (12, 4, 3, 12), (1, 4, 2, 8)])
def test_padded_rows_split_into_equal_updates_of_whole_micro_batches(rows, mbs, updates, expected):
    padded = padded_rows(rows, mbs, updates)
    assert padded == expected
    microbatches = list(range(padded // mbs))
    steps = _split_steps(microbatches, updates)
    assert [m for step in steps for m in step] == microbatches  # nothing left over
    assert len({len(step) for step in steps}) == 1


def test_filtered_rollout_keeps_every_group_across_updates():
    # G=2, mbs=2, U=2: a filtered group leaves 6 rows = 3 micro-batches, which used to split as 1 + 1 (one
    # whole group never trained on).
    rows = list(range(6))
    padded = rows + [None] * (padded_rows(len(rows), 2, 2) - len(rows))
    microbatches = [padded[i:i + 2] for i in range(0, len(padded), 2)]
    trained = [r for step in _split_steps(microbatches, 2) for mb in step for r in mb if r is not None]
    assert trained == rows


@pytest.mark.parametrize(("rows", "mbs", "updates", "real_per_update"),
                         [(5, 1, 4, [2, 1, 1, 1]), (3, 4, 2, [2, 1]), (9, 4, 4, [3, 2, 2, 2]), (6, 2, 2, [3, 3]),
                          (16, 2, 1, [16]), (3, 2, 1, [3])])
def test_a_filtered_rollout_gives_every_update_its_share_of_real_rows(rows, mbs, updates, real_per_update):
    """Zero-variance filtering leaves any number of rows; padding them at the end used to leave the last
    updates with padding only (5 rows, U = 4: 2, 2, 1 and 0 real rows), an Adam step on momentum alone."""
    total = padded_rows(rows, mbs, updates)
    order = rows_by_update(rows, total, updates)
    assert len(order) == total and sorted(i for i in order if i >= 0) == list(range(rows))
    microbatches = [order[i:i + mbs] for i in range(0, total, mbs)]
    steps = _split_steps(microbatches, updates)
    assert [sum(i >= 0 for mb in step for i in mb) for step in steps] == real_per_update
    if updates == 1:
        assert order[:rows] == list(range(rows))  # one update: the rollout's own order, padding after it


def test_split_steps_refuses_to_drop_micro_batches():
    with pytest.raises(ValueError, match="3 micro-batches do not split into 2 updates"):
        _split_steps(["a", "b", "c"], 2)


def _judgment(prompt: int, judgment: int, tag: str) -> JudgmentSample:
    return JudgmentSample(example_index=0, permutation=[0, 1], hinted=False, prompt=tag, grm_prompt=tag,
                          prompt_ids=[1] * prompt,
                          token_ids=[2] * judgment, logprobs=[-0.1] * judgment, text=tag, scores=[9, 1],
                          shown_scores=[9, 1], correct=True, parse_error=None, finish_reason="stop")


def test_rows_longer_than_seq_length_get_zero_weight_instead_of_ending_the_run():
    judged = [_judgment(10, 5, "a"), _judgment(10, 7, "b"), _judgment(12, 5, "c")]
    rows, advantages, too_long = fit_rows(judged, [1.0, -1.0, 0.5], seq_length=16)
    assert too_long == 2
    assert [r.text for r in rows] == ["a", "a", "a"]
    assert advantages == [1.0, None, None]
    assert fit_rows(judged, [1.0, -1.0, 0.5], seq_length=17) == (judged, [1.0, -1.0, 0.5], 0)
    with pytest.raises(ValueError, match="seq_length=14"):
        fit_rows(judged, [1.0, -1.0, 0.5], seq_length=14)


def test_a_rank_left_with_no_row_trains_a_zero_weight_row_that_fits():
    """Row 0 may be a judgment never written: training it alone made this rank raise while the others
    went on into the next collective and waited until the timeout."""
    from megatron_grm.stages.grpo import placeholder_row

    never_written = dataclasses.replace(_judgment(10, 0, "a"), finish_reason=PROMPT_TOO_LONG)
    judged = [never_written, _judgment(10, 9, "b"), _judgment(10, 5, "c")]
    assert placeholder_row(judged, seq_length=16) == 2
    rows, advantages, too_long = fit_rows([judged[placeholder_row(judged, 16)]], [None], seq_length=16)
    assert [r.text for r in rows] == ["c"] and advantages == [None] and too_long == 0


def test_a_judgment_the_engine_had_no_room_to_write_gets_zero_weight():
    never_written = dataclasses.replace(_judgment(10, 0, "b"), finish_reason=PROMPT_TOO_LONG)
    rows, advantages, too_long = fit_rows([_judgment(10, 5, "a"), never_written], [1.0, -1.0], seq_length=64)
    assert too_long == 1 and [r.text for r in rows] == ["a", "a"] and advantages == [1.0, None]


def test_the_hinted_prompt_is_measured_when_hinted_sampling_may_use_it():
    tokenizer = load_tokenizer("char")
    example = Example([Turn("user", "2+2?")], ["4", "5"], 0, source="t", id="e")
    plain = prompt_length(tokenizer, example, "compact", chat=False)
    hinted = prompt_length(tokenizer, example, "compact", chat=False, hint=True)
    assert hinted > plain
    limit = hinted + 3  # room for 4 tokens after the plain prompt, 3 after the hinted one
    assert split_by_prompt_room([example], tokenizer, "compact", False, 4, limit) == ([example], [])
    assert split_by_prompt_room([example], tokenizer, "compact", False, 4, limit, hint=True) == ([], [example])


def test_examples_whose_prompt_leaves_no_room_to_judge_are_left_out_and_counted(caplog):
    tokenizer = load_tokenizer("char")
    short = Example([Turn("user", "2+2?")], ["4", "5"], 0, source="t", id="short")
    long = Example([Turn("user", "x" * 300)], ["4", "5"], 0, source="t", id="long")
    s = GRPOSettings(max_new_tokens=64, template="compact", chat=False)
    kept = fitting_examples([short, long, short], tokenizer, s, seq_length=256)
    assert [e.id for e in kept] == ["short", "short"]
    assert "1 of 3 examples leave no room" in caplog.text and "'long'" in caplog.text
    with pytest.raises(ValueError, match="no example's prompt fits"):
        fitting_examples([long], tokenizer, s, seq_length=256)


@pytest.mark.parametrize(("interval", "max_steps", "due"), [(30, 60, [30, 60]), (0, 60, [60]), (25, 60, [25, 50, 60]),
                                                             (50, 3, [3]), (1, 3, [1, 2, 3])])
def test_validation_runs_every_interval_and_after_the_last_step(interval, max_steps, due):
    # Step 0 is validated before training starts; these are the steps validated after an update.
    assert [s for s in range(1, max_steps + 1) if validation_due(s, interval, max_steps)] == due


def test_validation_refuses_fewer_than_two_examples_or_samples():
    from megatron_grm.rollout.sampling import SamplingConfig
    from megatron_grm.stages.reward_validation import RewardValidation

    one = [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="one")]
    with pytest.raises(ValueError, match="holds 1 usable example"):
        RewardValidation(None, None, one, 4, SamplingConfig(), "compact", False, seed=0)
    with pytest.raises(ValueError, match="val_samples must be >= 1"):
        RewardValidation(None, None, one * 2, 0, SamplingConfig(), "compact", False, seed=0)


def test_rollouts_visit_every_example_once_per_epoch_in_a_shuffled_order():
    """GRPO took its examples in the data's file order (a list spec trained one source, then the next)."""
    from megatron_grm.stages.grpo import rollout_example_indices

    one = [i for r in range(2) for i in rollout_example_indices(r, 6, 0, 1, 12, seed=5)]
    assert sorted(one) == list(range(12)) and one != list(range(12))
    # Two DP ranks deal the same stream: rank 0 takes the first half of each rollout, rank 1 the second.
    two = [i for r in range(2) for rank in range(2) for i in rollout_example_indices(r, 3, rank, 2, 12, seed=5)]
    assert two == one
    second_epoch = [i for r in range(2, 4) for i in rollout_example_indices(r, 6, 0, 1, 12, seed=5)]
    assert sorted(second_epoch) == list(range(12)) and second_epoch != one
    assert rollout_example_indices(0, 6, 0, 1, 12, seed=6) != one[:6]


def test_the_zero_variance_fallback_is_decided_over_all_ranks():
    """4 groups of G=2; groups 0, 1 (rank 0's) and 2 have equal rewards. One process drops groups 0-2 and
    trains group 3. Split over two DP ranks, rank 0 used to fall back to training its groups with advantage
    0 (KL and tokens in the step); it now trains no real row, as one process would."""
    from megatron_grm.stages.grpo import rows_to_train

    assert rows_to_train(8, 2, [0, 1, 2], informative_anywhere=True) == [6, 7]
    rank0 = rows_to_train(4, 2, [0, 1], informative_anywhere=True)
    rank1 = [4 + i for i in rows_to_train(4, 2, [0], informative_anywhere=True)]
    assert rank0 + rank1 == [6, 7]
    assert rows_to_train(4, 2, [0, 1], informative_anywhere=False) == [0, 1, 2, 3]  # nothing anywhere: all rows


def test_a_requeued_run_keeps_the_kl_reference_it_started_from(tmp_path, caplog):
    """trainer.load=<RFT checkpoints folder> means its ``latest``, which moves while that run goes on: a
    requeued GRPO job re-resolved it and resumed against another reference than it started with."""
    import json

    from megatron_grm.stages.grpo import kl_reference_folder

    def checkpoint(root, step, **metadata):
        folder = root / f"iter_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "model_config.json").write_text(json.dumps({"step": step, **metadata}))
        (root / "latest").write_text(folder.name)
        return str(folder)

    rft, grpo = tmp_path / "rft" / "checkpoints", tmp_path / "grpo" / "checkpoints"
    first = checkpoint(rft, 10)
    assert kl_reference_folder(str(rft), str(grpo)) == first  # a fresh run: the folder `latest` names
    checkpoint(grpo, 2, kl_reference=first)
    later = checkpoint(rft, 20)  # the RFT run went on
    assert kl_reference_folder(str(rft), str(tmp_path / "other")) == later
    with caplog.at_level("WARNING"):
        assert kl_reference_folder(str(rft), str(grpo)) == first
    assert f"now resolves to {later}" in caplog.text
    assert kl_reference_folder(None, str(tmp_path / "none")) is None
    # The RFT run crashed re-saving step 20: `latest` resolves to the moved-aside copy, which its next save
    # deletes; the canonical name is recorded, and the copy is read while it is the only one.
    Path(later).rename(later + ".replaced")
    assert kl_reference_folder(str(rft), str(tmp_path / "fresh")) == later
    checkpoint(grpo, 4, kl_reference=later)
    assert kl_reference_folder(str(rft), str(grpo)) == later + ".replaced"
