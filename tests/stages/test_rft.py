"""Rejective fine-tuning (paper §3.2) on the tiny GRM, end to end on CPU with 2 gloo processes (DP = 2).

RFT needs a model that already writes judgments: these tests start from the bootstrapped model of the
session's ``pipeline`` fixture (tests/conftest.py: the demo at its test scale). That RFT raises held-out
accuracy over its starting model is asserted on the same pipeline (tests/pipeline/test_demo.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO, passes_log_line, read_json, torchrun

RFT = REPO / "megatron_grm" / "stages" / "rft.py"
N = 3


@pytest.fixture(scope="module")
def bootstrap(pipeline, tmp_path_factory) -> dict:
    """The pipeline's bootstrapped tiny GRM: {"checkpoint": its final iter_* folder, "too_long": a JSONL
    file of one example whose prompt alone fills the tiny model's 1024 positions}."""
    too_long = tmp_path_factory.mktemp("rft_data") / "too_long.jsonl"
    too_long.write_text(json.dumps({"id": TOO_LONG_ID, "context": "x" * 1100, "responses": ["1", "2"],
                                    "label": 0}) + "\n")
    return {"checkpoint": str(pipeline.checkpoint("bootstrap")), "too_long": str(too_long)}


EXAMPLES, SHARD, HELDOUT = 48, 16, 15
TOO_LONG_ID = "too-long-1"
INSTRUCTION_BLEND = "[0.75,digit_facts:1024,0.25,digit_facts:256:1]"  # Megatron's --data-path form


# The demo's configs keep torch's ops (its bootstrap's lottery, docs/measurements.md); these runs take the
# C++ passes of RMSNorm, SwiGLU and RoPE, every other stage's default, through sampling, SFT and resume.
PASSES = "trainer.cpu_elementwise_kernels=true"


def rft_args(run_dir: Path, load: str, too_long: str, *extra: str, heldout: int = 0) -> list[str]:
    """A small RFT run: 48 examples in 3 shards of 16 (DP rank 0 samples shards 0 and 2, rank 1 shard 1),
    plus the ``too_long`` file's example, which is left out before sharding. ``data.train`` and
    ``data.instruction`` are lists, as a blend of sources is written. ``heldout``: greedy held-out accuracy
    on that many examples before and after training (0: none)."""
    evaluation = ([f"data.heldout=arithmetic:heldout:{heldout}", "rft.eval_before=true"] if heldout else
                  ["data.heldout=null", "rft.eval_before=false"])
    return ["+experiment=rft_tiny", f"trainer.run_dir={run_dir}", f"trainer.load={load}",
            f"data.train=[arithmetic:train:{EXAMPLES},{too_long}]", f"rft.shard_size={SHARD}", *evaluation,
            f"data.instruction={INSTRUCTION_BLEND}",
            "trainer.max_steps=4", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
            "trainer.log_interval=1", PASSES, *extra]


@pytest.fixture(scope="module")
def rft_run(bootstrap, tmp_path_factory) -> Path:
    """One uninterrupted ``rft.phase=all`` run: sample → filter → 4 SFT steps → checkpoint."""
    run_dir = tmp_path_factory.mktemp("rft") / "run"
    checkpoints = str(Path(bootstrap["checkpoint"]).parent)  # a checkpoints folder: its latest is loaded
    proc = torchrun(RFT, 2, rft_args(run_dir, checkpoints, bootstrap["too_long"], heldout=HELDOUT), timeout=1200)
    (run_dir / "stage_output.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_only_rank_0_logs_info_and_writes_the_run_log(rft_run):
    """Under Hydra (which configures logging first) every line carries its rank; rank 1 logs warnings only,
    and only rank 0 appends to the run's log file (a shared filesystem on a cluster)."""
    output = (rft_run / "stage_output.txt").read_text()
    assert " rank0] INFO " in output
    assert " rank1] INFO " not in output
    logs = list((rft_run / "hydra").glob("*.log"))
    assert logs, sorted(p.name for p in (rft_run / "hydra").iterdir())
    text = "".join(p.read_text() for p in logs)
    assert " rank0] INFO " in text and " rank1]" not in text


def read_records(samples_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(samples_dir.glob("shard_*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_rft_end_to_end_filter_statistics_in_tensorboard_equal_the_jsonl(rft_run: Path):
    records = read_records(rft_run / "samples")
    by_example: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_example[r["example_index"]].append(r)
    assert sorted(by_example) == list(range(EXAMPLES))

    # The filtering rule, checked record by record (paper §3.2, Eq. 10).
    too_easy = hinted = kept = 0
    for index, group in by_example.items():
        plain = [r for r in group if not r["hinted"]]
        hint = [r for r in group if r["hinted"]]
        assert [r["sample_index"] for r in plain] == list(range(N))
        assert {r["shard"] for r in group} == {index // SHARD}
        all_correct = all(r["correct"] for r in plain)
        too_easy += all_correct
        for r in plain:
            assert r["too_easy"] == all_correct
            assert r["kept"] == (r["correct"] and not all_correct)
            assert r["correct"] == (r["scores"] is not None and r["scores"][r["label"]] > max(
                s for i, s in enumerate(r["scores"]) if i != r["label"]))
        # One hinted sample exactly for the examples none of whose N samples is correct (hinted_fraction 1).
        assert len(hint) == (0 if any(r["correct"] for r in plain) else 1)
        for r in hint:
            assert r["kept"] == r["correct"] and "The best response is" not in r["prompt"]
        hinted += len(hint)
        kept += sum(r["kept"] for r in group)
    correct_plain = sum(r["correct"] for r in records if not r["hinted"])

    # The starting model has signal: some judgments kept, some examples too easy, some hinted.
    assert kept > 0 and too_easy > 0 and hinted > 0

    tb = {tag: scalars(rft_run, f"rft/{tag}")[0] for tag in
          ("examples", "judgments", "kept", "rejected", "too_easy", "too_easy_judgments", "hinted", "accuracy")}
    assert tb["examples"] == EXAMPLES
    assert tb["judgments"] == len(records) == EXAMPLES * N + hinted
    assert tb["kept"] == kept
    assert tb["rejected"] == sum(not r["correct"] for r in records)
    assert tb["too_easy"] == too_easy and tb["too_easy_judgments"] == N * too_easy
    assert tb["hinted"] == hinted
    assert tb["accuracy"] == pytest.approx(correct_plain / (EXAMPLES * N), abs=1e-6)
    assert tb["judgments"] == tb["kept"] + tb["rejected"] + tb["too_easy_judgments"]

    # SFT ran on the kept judgments (+30% instruction data) and left a checkpoint.
    loss = scalars(rft_run, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4] and all(math.isfinite(v) for v in loss.values())
    waste = scalars(rft_run, "train/padding_waste")
    assert sorted(waste) == [1, 2, 3, 4] and all(0 <= v < 0.5 for v in waste.values())
    results = read_json(rft_run / "rft_results.json")
    assert results["sft_judgments"] == kept
    assert results["sft_instruction"] == round(kept * 0.3 / 0.7)
    per_source = results["sft_instruction_sources"]  # the blend, shared out 3:1
    assert list(per_source) == ["digit_facts:1024", "digit_facts:256:1"]
    assert sum(per_source.values()) == results["sft_instruction"]
    assert abs(per_source["digit_facts:1024"] - 0.75 * results["sft_instruction"]) <= 1
    assert (rft_run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert (rft_run / "checkpoints" / "iter_0000004" / "model_config.json").exists()
    # The example with no room for a judgment was left out before sharding, counted and named.
    assert results["too_long_examples"] == 1
    assert TOO_LONG_ID not in {r["example_id"] for r in records}
    log = (rft_run / "stage_output.txt").read_text()
    assert f"RFT: 1 of {EXAMPLES + 1} examples leave no room" in log and repr(TOO_LONG_ID) in log


def test_instruction_data_is_checked_before_sampling(bootstrap, tmp_path: Path):
    """A positive rft.instruction_ratio with no data.instruction fails at start-up, not after the sampling."""
    run_dir = tmp_path / "run"
    proc = torchrun(RFT, 1, rft_args(run_dir, bootstrap["checkpoint"], bootstrap["too_long"],
                                     "data.instruction=null", "rft.instruction_ratio=0.5"), check=False)
    assert proc.returncode != 0
    assert "rft.instruction_ratio=0.5 needs instruction data: set data.instruction" in proc.stdout + proc.stderr
    assert not list((run_dir / "samples").glob("shard_*"))


def test_a_run_resumed_at_its_last_step_still_measures_heldout_accuracy_after(rft_run: Path, bootstrap,
                                                                               tmp_path: Path):
    """A job that ended between its final checkpoint and rft_results.json: the rerun trains no step but
    measures the held-out accuracy of the final weights, as the uninterrupted run did."""
    run_dir = tmp_path / "run"
    shutil.copytree(rft_run, run_dir, ignore=shutil.ignore_patterns("rft_results.json", "tensorboard"))
    torchrun(RFT, 2, rft_args(run_dir, bootstrap["checkpoint"], bootstrap["too_long"], "rft.phase=train",
                              heldout=HELDOUT), timeout=600)
    results, reference = read_json(run_dir / "rft_results.json"), read_json(rft_run / "rft_results.json")
    assert "heldout_accuracy_before" not in results  # not a fresh run
    assert results["heldout_accuracy_after"] == pytest.approx(reference["heldout_accuracy_after"])
    assert sorted(scalars(run_dir, "train/loss")) == []  # no step trained again


def test_heldout_accuracy_before_and_after_training(rft_run: Path):
    """Greedy Eq. 10 accuracy on 15 held-out examples, split over the 2 DP ranks (8 + 7 judgments, summed):
    logged at step 0 and the last step and written to rft_results.json."""
    logged = scalars(rft_run, "eval/heldout_accuracy")
    results = read_json(rft_run / "rft_results.json")
    assert sorted(logged) == [0, 4]
    assert logged[0] == pytest.approx(results["heldout_accuracy_before"])
    assert logged[4] == pytest.approx(results["heldout_accuracy_after"])
    for accuracy in logged.values():
        assert 0.0 <= accuracy <= 1.0
        assert accuracy * HELDOUT == pytest.approx(round(accuracy * HELDOUT), abs=1e-6)  # counts over all 15


def test_resumed_sampling_resamples_only_the_unfinished_shard(rft_run: Path, bootstrap, tmp_path: Path):
    samples = tmp_path / "samples"
    shutil.copytree(rft_run / "samples", samples)
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in samples.glob("shard_*.jsonl")}
    assert sorted(before) == ["shard_00000.jsonl", "shard_00001.jsonl", "shard_00002.jsonl"]
    (samples / "shard_00001.done").unlink()  # shard 1 was interrupted: its file is not trusted

    torchrun(RFT, 2, rft_args(tmp_path / "run", bootstrap["checkpoint"], bootstrap["too_long"], "rft.phase=sample",
                              f"rft.samples_dir={samples}"), timeout=900)

    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in samples.glob("shard_*.jsonl")}
    assert (samples / "shard_00001.done").exists()
    assert after["shard_00000.jsonl"][0] == before["shard_00000.jsonl"][0]
    assert after["shard_00002.jsonl"][0] == before["shard_00002.jsonl"][0]
    assert after["shard_00001.jsonl"][0] != before["shard_00001.jsonl"][0]
    # Each shard has its own seeds: the resampled shard repeats the uninterrupted run's draw.
    assert after["shard_00001.jsonl"][1] == before["shard_00001.jsonl"][1]
    # A sample-only job still reports the filter statistics, read back from every shard.
    assert scalars(tmp_path / "run", "rft/judgments")[0] == len(read_records(samples))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_resumed_rft_sft_continues_exactly(rft_run: Path, bootstrap, tmp_path: Path):
    """A train-only job on the same samples, stopped after 2 of 4 steps and resumed, matches the
    uninterrupted run that sampled in-process: same losses, same padding accounting. Both train on the C++
    passes (``PASSES``), as their logs say."""
    assert passes_log_line() in (rft_run / "stage_output.txt").read_text()
    run_dir = tmp_path / "run"
    args = rft_args(run_dir, bootstrap["checkpoint"], bootstrap["too_long"], "rft.phase=train",
                    f"rft.samples_dir={rft_run / 'samples'}")
    torchrun(RFT, 2, [*args, "trainer.exit_after_steps=2"], timeout=900)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    proc = torchrun(RFT, 2, args, timeout=900)
    assert passes_log_line() in proc.stdout + proc.stderr

    resumed, reference = scalars(run_dir, "train/loss"), scalars(rft_run, "train/loss")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert read_json(run_dir / "rft_results.json")["padding_waste"] == pytest.approx(
        read_json(rft_run / "rft_results.json")["padding_waste"], abs=1e-12)


def _shard_record(index: int, shard: int, /, **changes) -> dict:
    """A shard line as ``judgment_record`` writes it (docs/rft.md), with ``changes``."""
    return {"example_id": f"ex{index}", "example_index": index, "shard": shard, "sample_index": 0, "hinted": False,
            "permutation": [1, 0], "prompt": "P", "grm_prompt": "G", "chat": True, "text": "T", "scores": [2, 8],
            "parse_error": None, "correct": True, "kept": True, "too_easy": False, "label": 0, "num_responses": 2,
            "num_tokens": 5, "finish_reason": "stop", **changes}


def test_reading_the_samples_names_a_broken_shard_line_and_an_unfinished_shard(tmp_path: Path):
    from megatron_grm.stages.rft_shards import MANIFEST, done_marker, read_shards, shard_file

    (tmp_path / MANIFEST).write_text(json.dumps({"num_shards": 2}))
    Path(shard_file(str(tmp_path), 0)).write_text(json.dumps(_shard_record(0, 0)) + "\n\n")
    Path(shard_file(str(tmp_path), 1)).write_text(json.dumps(_shard_record(1, 1)) + "\n")
    Path(done_marker(str(tmp_path), 0)).write_text("")
    with pytest.raises(RuntimeError, match="1 of 2 shards .* unfinished \\(first: 1\\)"):
        read_shards(str(tmp_path))
    Path(done_marker(str(tmp_path), 1)).write_text("")
    assert [r["example_index"] for r in read_shards(str(tmp_path))] == [0, 1]
    Path(shard_file(str(tmp_path), 1)).write_text(json.dumps(_shard_record(1, 1)) + "\n" + '{"example_index": 2, "te')
    with pytest.raises(ValueError, match=r"shard_00001.jsonl:2: invalid JSON"):
        read_shards(str(tmp_path))


@pytest.mark.parametrize(("changes", "message"), [
    ({"hinted": None}, "field 'hinted' must be bool, got None"),  # a KeyError/TypeError naming no line before
    ({"kept": "false"}, "field 'kept' must be bool"),  # "false" would count as kept
    ({"example_index": True}, "field 'example_index' must be int"),
    ({"scores": [2, "8"]}, "field 'scores' must be a list of integers"),
    ({"shard": 0}, "field 'shard' is 0, but the record is in shard 1"),
    ({"grm_prompt": "G", "chat": None}, "field 'chat' must be bool"),
])
def test_reading_the_samples_names_the_shard_line_and_field_of_a_bad_record(tmp_path: Path, changes, message):
    from megatron_grm.stages.rft_shards import MANIFEST, done_marker, read_shards, shard_file

    (tmp_path / MANIFEST).write_text(json.dumps({"num_shards": 2}))
    for k in (0, 1):
        Path(done_marker(str(tmp_path), k)).write_text("")
    Path(shard_file(str(tmp_path), 0)).write_text(json.dumps(_shard_record(0, 0)) + "\n")
    Path(shard_file(str(tmp_path), 1)).write_text(json.dumps(_shard_record(1, 1)) + "\n"
                                                  + json.dumps(_shard_record(2, 1, **changes)) + "\n")
    with pytest.raises(ValueError, match=rf"shard_00001.jsonl:2: {re.escape(message)}"):
        read_shards(str(tmp_path))
    missing = {k: v for k, v in _shard_record(2, 1).items() if k != "too_easy"}
    Path(shard_file(str(tmp_path), 1)).write_text(json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match=r"shard_00001.jsonl:1: field 'too_easy' is missing"):
        read_shards(str(tmp_path))
    old = {k: v for k, v in _shard_record(2, 1).items() if k not in ("grm_prompt", "chat")}
    Path(shard_file(str(tmp_path), 1)).write_text(json.dumps(old) + "\n")  # shards from before grm_prompt
    assert [r["example_id"] for r in read_shards(str(tmp_path))] == ["ex0", "ex2"]


def test_filter_statistics_count_a_never_generated_judgment_apart_from_the_accuracy():
    from megatron_grm.stages.rft import filter_statistics

    def record(index: int, correct: bool, kept: bool, finish: str, scores=(8, 2)) -> dict:
        return {"example_index": index, "hinted": False, "kept": kept, "correct": correct, "too_easy": False,
                "scores": None if finish == "prompt_too_long" else list(scores), "finish_reason": finish}

    stats = filter_statistics([record(0, True, True, "stop"), record(0, False, False, "stop", (2, 8)),
                               record(0, False, False, "prompt_too_long")])
    assert stats["judgments"] == 3 and stats["rejected"] == 2 and stats["kept"] == 1
    assert stats["prompt_too_long"] == 1 and stats["unparseable"] == 0
    assert stats["accuracy"] == 0.5  # of the two judgments generated
