"""SPCT in miniature (the README's first command, at the test scale): every stage runs through its real
entry point, the paper-shaped table holds a measured number in every row, the pipeline improves on its own
base model, and the Hugging Face export scores a new example through the README's snippet. The run itself
is the session's ``pipeline`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, read_json


def accuracy(pipeline, model: str, method: str = "Greedy") -> float:
    return pipeline.results["results"][model]["accuracy"][method]["arithmetic"]


def test_the_table_has_every_row_with_a_measured_number(pipeline):
    table = (pipeline.run_dir / "demo_results.md").read_text()
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", table, flags=re.M))
    ks = [1, 2]  # megatron_grm/demo.py, the test scale
    expected = ["Base (bootstrap) greedy", "RFT greedy", "GRPO greedy", *(f"GRPO Voting@{k}" for k in ks),
                *(f"GRPO MetaRM@{k}" for k in ks)]
    assert [r for r in rows if r != "model / method"] == expected
    for label, model in (("Base (bootstrap) greedy", "Base"), ("RFT greedy", "RFT"), ("GRPO greedy", "GRPO")):
        assert float(rows[label]) == round(100 * accuracy(pipeline, model), 1)
        # The number is the evaluation stage's own results.json, not something the demo computed.
        stage = {"Base": "eval_base", "RFT": "eval_rft", "GRPO": "eval_grpo"}[model]
        assert read_json(pipeline.run_dir / stage / "results.json")["accuracy"]["Greedy"]["arithmetic"] == \
            accuracy(pipeline, model)
    for label in expected:
        assert 0.0 <= float(rows[label]) <= 100.0, label  # a number, not "n/a"
    for stage in ("bootstrap", "rft", "grpo", "metarm"):
        assert list((pipeline.run_dir / stage / "tensorboard").glob("events.out.tfevents.*")), stage


# Held-out accuracy is measured on 400 examples: one standard error is <= 2.5 points.
NOISE_MARGIN = 0.05


def test_rft_raises_heldout_accuracy_over_the_base_and_grpo_keeps_it(pipeline):
    base, rft, grpo = (accuracy(pipeline, m) for m in ("Base", "RFT", "GRPO"))
    print(f"held-out greedy accuracy: base {base:.3f}, RFT {rft:.3f}, GRPO {grpo:.3f}")
    assert rft > base
    assert grpo >= rft - NOISE_MARGIN


def test_paired_comparisons_agree_with_each_evaluations_own_results(pipeline):
    """Every evaluation's outcomes.jsonl gives back its results.json accuracies, and the demo's paired
    comparisons (RFT vs Base, GRPO vs RFT, by example) are differences of exactly those accuracies."""
    from megatron_grm.stages.eval_compare import read_outcomes

    for stage in ("eval_base", "eval_rft", "eval_grpo"):
        accuracies = read_json(pipeline.run_dir / stage / "results.json")["accuracy"]
        outcomes = read_outcomes(pipeline.run_dir / stage)
        assert {m for m, _ in outcomes} == set(accuracies), stage
        for (method, benchmark), verdicts in outcomes.items():
            assert len(verdicts) == 400
            assert sum(verdicts.values()) / len(verdicts) == pytest.approx(accuracies[method][benchmark], abs=1e-12)
    for label, (a, b) in (("RFT vs Base", ("Base", "RFT")), ("GRPO vs RFT", ("RFT", "GRPO"))):
        cells = {c["method"]: c for c in pipeline.results["paired"][label]}
        assert "Greedy" in cells and "Voting@1" in cells, label
        greedy = cells["Greedy"]
        assert greedy["difference"] == pytest.approx(accuracy(pipeline, b) - accuracy(pipeline, a), abs=1e-12)
        assert greedy["only_b"] - greedy["only_a"] == round(400 * greedy["difference"])
        assert 0 < greedy["standard_error"] < 0.05 and 0 <= greedy["p_value"] <= 1
    table = (pipeline.run_dir / "demo_results.md").read_text()
    assert "| method | benchmark | examples | RFT | GRPO | GRPO − RFT (± SE) |" in table


def test_the_demo_draws_the_three_models_against_k(pipeline):
    from megatron_grm.stages.plots import read_scaling

    assert (pipeline.run_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_scaling(pipeline.run_dir / "eval_grpo")["k"] == [1, 2]  # the test scale's ks: a curve, not a point
    for model in ("Base", "RFT", "GRPO"):
        assert read_scaling(pipeline.run_dir / f"eval_{model.lower()}")["Greedy"] == accuracy(pipeline, model)


def test_each_stage_records_the_prompt_template_it_trained_on(pipeline):
    """What evaluation checks a GRM against (``stages.common.prompt_template_mismatch``): the demo trains and
    evaluates on the compact template without chat formatting, so its checkpoints must say so."""
    for stage in ("bootstrap", "rft", "grpo"):
        recorded = read_json(pipeline.checkpoint(stage) / "model_config.json").get("prompt")
        assert recorded == {"template": "compact", "chat": False}, stage


def readme_snippet() -> str:
    """The README's "score an example with the exported model" code block."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- hf-snippet -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, "README.md has no hf-snippet block"
    return match.group(1)


def test_readme_snippet_scores_a_new_example_with_the_hf_export(pipeline, tmp_path):
    code = readme_snippet()
    assert "runs/demo/hf/grm" in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("runs/demo/hf/grm", str(pipeline.run_dir / "hf" / "grm")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = re.search(r"^scores: \[(\d+), (\d+)\]$", proc.stdout, flags=re.M)
    assert scores, proc.stdout[-2000:]  # transformers' greedy judgment parses: two scores in 1-10
    assert all(1 <= int(s) <= 10 for s in scores.groups())


def test_a_demo_rerun_in_the_same_folder_at_another_scale_is_refused(tmp_path):
    """Each stage resumes from its folder: another scale (or seed) would mix two runs in one table, and
    since resumes check the LR schedule, fail inside the first stage instead of saying why."""
    from megatron_grm.demo import check_scale

    check_scale(tmp_path, "test", 1234)
    check_scale(tmp_path, "test", 1234)  # the same run again: resumes
    with pytest.raises(SystemExit, match="holds a demo run with {'scale': 'test', 'seed': 1234}; this one asks "
                                         "for {'scale': 'full', 'seed': 1234}: give another --run-dir"):
        check_scale(tmp_path, "full", 1234)
