"""The evaluation stage: voting@k / MetaRM@k on injected judgments equal hand-computed accuracies, and an
end-to-end run on RMB files (read in place) with the tiny model that writes results.json, the table and a
real PNG.

Hand-computed case (ks = 1, 2, 4; k_meta = k/2, at least 1), no ties anywhere, so no coin is tossed:

benchmark ``pairs`` (n >= 2; draws are scores in the original order, meta score after the bar)
  e1 (best 0, cat a/x): d0 [3,7] .1 | d1 [8,2] .9 | d2 [9,1] .5 | d3 [2,6] -1
      Voting@1 [3,7] wrong, @2 [11,9] right, @4 [22,16] right
      MetaRM@1 d0 wrong, @2 keeps d1 right, @4 keeps d1,d2 [17,3] right
  e2 (best 1, cat a/y): d0 [6,5] .3 | d1 [4,9] .2 | d2 [9,1] -.4 | d3 [3,6] .7
      Voting@1 wrong, @2 [10,14] right, @4 [22,21] wrong
      MetaRM@1 wrong, @2 keeps d0 wrong, @4 keeps d3,d0 [9,11] right
  e3 (best 2 of 3, cat b/x): d0 [5,4,6] 0 | d1 unparseable -.5 | d2 [8,2,1] .6 | d3 [1,3,9] .4
      Voting@1 right, @2 [5,4,6] right, @4 [14,9,16] right
      MetaRM@1 right, @2 keeps d0 right, @4 keeps d2,d3 [9,5,10] right
  Greedy (Eq. 10): e1 [7,3] right, e2 [5,5] wrong (a tie), e3 unparseable wrong -> 1/3
  LLM-as-a-judge: e1 picks 0 right, e2 picks 0 wrong, e3 picks 2 right -> 2/3
  => Voting 1/3, 1, 2/3; MetaRM 1/3, 2/3, 1

benchmark ``single`` (n = 1, verdict 0/1; majority of the parseable verdicts)
  s1 (1): [1] .5 | [1] -.2 | [1] .1 | [0] -.5     s2 (0): [1] -.9 | [1] .4 | [0] -.3 | none 0
  s3 (1): [1] 0 | [1] .6 | none .2 | [0] .1       s4 (0): [0] .2 | none .1 | [1] .9 | [1] .3
  Voting@1: right wrong right right; @2: r w r r; @4: 3/4->1 r, 2/3->1 w, 2/3->1 r, 2/3->1 w
  MetaRM@2 keeps d0, d1, d1, d0: r w r r; @4 keeps (d0,d2) (d1,d3) (d1,d2) (d2,d3): r w r w
  Greedy: [1] r, [0] r, none w, [1] w
  => Voting .75 .75 .5; MetaRM .75 .75 .5; Greedy .5; no baseline row (nothing to compare)
  ROC-AUC of the summed verdicts: Voting@4 rewards 3,2,2,2 -> 0.75; MetaRM@4 rewards 2,1,1,2 -> 0.5
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, RMB_ROOT, read_json, torchrun

STAGE = REPO / "megatron_grm" / "stages" / "evaluate.py"
SCRIPTS = Path(__file__).parent / "scripts"
RMB = RMB_ROOT
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PAIRS = [  # (id, responses, best, category)
    ("e1", ["A", "B"], 0, "a/x"),
    ("e2", ["C", "D"], 1, "a/y"),
    ("e3", ["E", "F", "G"], 2, "b/x"),
]
SINGLE = [("s1", 1), ("s2", 0), ("s3", 1), ("s4", 0)]
N = None  # an unparseable judgment
SAMPLE_DRAWS = {
    ("pairs", "e1"): [([3, 7], .1), ([8, 2], .9), ([9, 1], .5), ([2, 6], -1.0)],
    ("pairs", "e2"): [([6, 5], .3), ([4, 9], .2), ([9, 1], -.4), ([3, 6], .7)],
    ("pairs", "e3"): [([5, 4, 6], 0.0), (N, -.5), ([8, 2, 1], .6), ([1, 3, 9], .4)],
    ("single", "s1"): [([1], .5), ([1], -.2), ([1], .1), ([0], -.5)],
    ("single", "s2"): [([1], -.9), ([1], .4), ([0], -.3), (N, 0.0)],
    ("single", "s3"): [([1], 0.0), ([1], .6), (N, .2), ([0], .1)],
    ("single", "s4"): [([0], .2), (N, .1), ([1], .9), ([1], .3)],
}
GREEDY_DRAWS = {("pairs", "e1"): [7, 3], ("pairs", "e2"): [5, 5], ("pairs", "e3"): N,
                ("single", "s1"): [1], ("single", "s2"): [0], ("single", "s3"): N, ("single", "s4"): [1]}
JUDGE_DRAWS = {("pairs", "e1"): [1, 0], ("pairs", "e2"): [1, 0], ("pairs", "e3"): [0, 0, 1]}

EXPECTED = {
    "Greedy": {"pairs": 1 / 3, "single": 0.5},
    "LLM-as-a-judge": {"pairs": 2 / 3},
    "Voting@1": {"pairs": 1 / 3, "single": 0.75},
    "Voting@2": {"pairs": 1.0, "single": 0.75},
    "Voting@4": {"pairs": 2 / 3, "single": 0.5},
    "MetaRM@1": {"pairs": 1 / 3, "single": 0.75},
    "MetaRM@2": {"pairs": 2 / 3, "single": 0.75},
    "MetaRM@4": {"pairs": 1.0, "single": 0.5},
}


def _write_examples(folder: Path) -> tuple[Path, Path]:
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": i, "context": f"Question {i}?", "responses": r, "label": best,
                                         "category": cat}) + "\n" for i, r, best, cat in PAIRS))
    single = folder / "single.jsonl"
    single.write_text("".join(json.dumps({"id": i, "context": f"Question {i}?", "responses": [f"answer {i}"],
                                          "label": label}) + "\n" for i, label in SINGLE))
    return pairs, single


def _write_draws(path: Path) -> None:
    records = []
    for (bench, ex), draws in SAMPLE_DRAWS.items():
        for d, (scores, meta) in enumerate(draws):
            records.append({"benchmark": bench, "example_id": ex, "method": "sample", "draw": d, "scores": scores,
                            "text": f"judgment {d}", "meta_score": meta, "extra_field": "ignored"})
    for (bench, ex), scores in GREEDY_DRAWS.items():
        records.append({"benchmark": bench, "example_id": ex, "method": "greedy", "draw": 0, "scores": scores})
    for (bench, ex), scores in JUDGE_DRAWS.items():
        records.append({"benchmark": bench, "example_id": ex, "method": "judge", "draw": 0, "scores": scores})
    records.append({"benchmark": "other", "example_id": "zz", "method": "sample", "draw": 0, "scores": [1, 2]})
    random.Random(0).shuffle(records)  # file order must not matter
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _injected_args(root: Path, run_dir: Path) -> list[str]:
    pairs, single = root / "pairs.jsonl", root / "single.jsonl"
    return ["+experiment=eval_tiny", "model=tiny", "trainer.load=null", "eval.metarm=null",
            "eval.judge_baseline=true", f"trainer.run_dir={run_dir}", "eval.ks=[4,1,2]", "eval.max_new_tokens=16",
            f"eval.benchmarks=[{{name:pairs,data:'{pairs}'}},{{name:single,data:'{single}'}}]",
            f"eval.samples_in={root / 'draws.jsonl'}", "eval.per_category_depth=1"]


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_injected")
    assert _write_examples(root) == (root / "pairs.jsonl", root / "single.jsonl")
    _write_draws(root / "draws.jsonl")
    run_dir = root / "run"
    torchrun(STAGE, 1, _injected_args(root, run_dir), timeout=240)
    return run_dir


def test_injected_judgments_give_hand_computed_accuracies(injected):
    results = read_json(injected / "results.json")
    assert set(results["accuracy"]) == set(EXPECTED)
    for row, per_benchmark in EXPECTED.items():
        assert results["accuracy"][row] == pytest.approx(per_benchmark), row
    assert results["overall"]["Voting@2"] == pytest.approx((1.0 + 0.75) / 2)
    assert results["overall"]["MetaRM@4"] == pytest.approx((1.0 + 0.5) / 2)
    assert results["overall"]["LLM-as-a-judge"] is None  # no result on the single-response set
    assert results["per_category"]["Voting@1"]["pairs"] == pytest.approx({"a": 0.0, "b": 1.0})
    assert results["roc_auc"]["Voting@4"] == pytest.approx({"single": 0.75})
    assert results["roc_auc"]["MetaRM@4"] == pytest.approx({"single": 0.5})
    assert results["scaling"]["k"] == [1, 2, 4]
    assert results["scaling"]["Voting"] == pytest.approx([(1 / 3 + .75) / 2, (1 + .75) / 2, (2 / 3 + .5) / 2])
    assert results["scaling"]["MetaRM"] == pytest.approx([(1 / 3 + .75) / 2, (2 / 3 + .75) / 2, (1 + .5) / 2])
    assert results["examples"] == {"pairs": {"used": 3, "skipped": {}}, "single": {"used": 4, "skipped": {}}}
    assert results["tie_rate"]["Voting@4"] == {"pairs": 0.0, "single": 0.0}  # no coin was tossed


def test_a_line_torn_by_a_killed_append_is_cut_and_the_rerun_completes(injected, tmp_path):
    """A SIGKILL mid-append leaves samples.jsonl ending in half a line: the rerun of the same command cuts
    it (those draws are taken again) instead of failing on it at every attempt."""
    from megatron_grm.stages.eval_draws import drop_torn_tail

    path = tmp_path / "lines.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert drop_torn_tail(str(path), block=4) == 6 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert drop_torn_tail(str(path)) == 0 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"half')
    assert drop_torn_tail(str(path)) == 6 and path.read_bytes() == b""

    run_dir = tmp_path / "run"
    shutil.copytree(injected, run_dir)
    samples = run_dir / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    proc = torchrun(STAGE, 1, _injected_args(injected.parent, run_dir), timeout=240)
    assert "did not finish writing" in proc.stdout + proc.stderr
    assert read_json(run_dir / "results.json")["accuracy"] == read_json(injected / "results.json")["accuracy"]
    assert samples.read_text() == "".join(lines)  # the cut draw is back, the file whole again


def test_injected_run_writes_the_table_and_keeps_every_draw(injected):
    table = (injected / "results.md").read_text()
    assert "| Method | pairs | single | Overall |" in table
    assert "| Voting@4 | 66.7 | 50.0 | 58.3 |" in table
    assert "| MetaRM@4 | 100.0 | 50.0 | 75.0 |" in table
    assert "| LLM-as-a-judge | 66.7 | - | - |" in table
    assert "Votes decided by the seeded coin" not in table  # no ties in the injected judgments
    lines = [json.loads(line) for line in (injected / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 7 * 4 + 7 + 3  # the injected draws of evaluated examples, nothing sampled, no strays
    assert {(d["benchmark"], d["example_id"]) for d in lines} == set(SAMPLE_DRAWS)
    e2 = sorted((d for d in lines if d["example_id"] == "e2" and d["method"] == "sample"), key=lambda d: d["draw"])
    assert [d["meta_score"] for d in e2] == [.3, .2, -.4, .7]
    assert (injected / "scaling.png").read_bytes()[:8] == PNG_SIGNATURE



def test_the_plot_tool_reads_the_evaluations_curves_overall_and_per_benchmark(injected, tmp_path):
    """tools/plot.py on a real evaluation folder: the curves it draws are the hand-computed accuracies."""
    from megatron_grm.stages.plots import plot_runs, read_scaling

    overall = read_scaling(injected)
    assert overall["k"] == [1, 2, 4] and "LLM-as-a-judge" not in overall  # no overall judge accuracy
    assert overall["Voting"] == pytest.approx([(1 / 3 + .75) / 2, (1 + .75) / 2, (2 / 3 + .5) / 2])
    pairs = read_scaling(injected, "pairs")
    assert pairs["Voting"] == pytest.approx([EXPECTED[f"Voting@{k}"]["pairs"] for k in (1, 2, 4)])
    assert pairs["MetaRM"] == pytest.approx([EXPECTED[f"MetaRM@{k}"]["pairs"] for k in (1, 2, 4)])
    assert (pairs["Greedy"], pairs["LLM-as-a-judge"]) == pytest.approx((1 / 3, 2 / 3))
    assert "LLM-as-a-judge" not in read_scaling(injected, "single")
    drawn = plot_runs({"overall": overall, "pairs": pairs}, str(tmp_path / "two.png"))
    assert drawn["pairs MetaRM@k"] == ([1, 2, 4], pytest.approx([100 / 3, 200 / 3, 100.0]))
    assert drawn["pairs LLM-as-a-judge"] == ([1, 2, 4], pytest.approx([200 / 3] * 3))
    assert (tmp_path / "two.png").read_bytes()[:8] == PNG_SIGNATURE

@pytest.mark.skipif(not RMB.is_dir(), reason="RMB data not present in shared/data")
def test_rmb_end_to_end_with_the_tiny_model(tmp_path):
    """MetaRM stage (a few steps) then evaluation on 8 pairwise + 4 best-of-N RMB examples, 2 processes."""
    from tests.stages.scripts.metarm_data import synthetic_judgment_records, write_records

    samples = write_records(synthetic_judgment_records(40), tmp_path / "rft_samples.jsonl")
    out = tmp_path / "out.json"
    torchrun(SCRIPTS / "eval_rmb.py", 2, ["--root", str(tmp_path), "--rmb", str(RMB), "--samples", str(samples),
                                          "--out", str(out)], timeout=420)
    got = read_json(out)
    run_dir = Path(got["run_dir"])
    results = read_json(run_dir / "results.json")
    for row in ("Greedy", "LLM-as-a-judge", "Voting@1", "Voting@4", "MetaRM@1", "MetaRM@4"):
        assert set(results["accuracy"][row]) == {"rmb_pairwise", "rmb_bon"}, row
        assert all(0.0 <= v <= 1.0 for v in results["accuracy"][row].values())
    used = {b: e["used"] for b, e in results["examples"].items()}
    assert used == {"rmb_pairwise": 8, "rmb_bon": 4}
    # The char tokenizer cannot encode most of RMB (non-ASCII) and most prompts exceed the tiny context:
    # those examples are skipped and counted, never silently dropped.
    skipped = results["examples"]["rmb_pairwise"]["skipped"]
    assert skipped.get("untokenizable", 0) + skipped.get("too_long", 0) > 0
    draws = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    sampled = [d for d in draws if d["method"] == "sample"]
    assert len(sampled) == (8 + 4) * 4  # max(k) = 4 draws per example, sampled once for every k
    assert all(isinstance(d["meta_score"], float) for d in sampled)
    sizes = {d["benchmark"]: len(d["permutation"]) for d in sampled}
    assert sizes["rmb_pairwise"] == 2 and sizes["rmb_bon"] >= 3
    table = (run_dir / "results.md").read_text()
    assert "| Method | rmb_pairwise | rmb_bon | Overall |" in table
    # An untrained model writes no parseable judgment: every vote is a coin flip, and the report says so.
    assert results["tie_rate"]["Voting@4"] == {"rmb_pairwise": 1.0, "rmb_bon": 1.0}
    assert "| Voting@4 | 100.0 | 100.0 |" in table.split("Votes decided by the seeded coin")[1]
    png = run_dir / "scaling.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # lines were drawn, not a blank canvas
    # Chunks of one example per rank: every example's response orders and judgments are the same draws.
    rechunked = [json.loads(line) for line in (Path(got["rechunked_dir"]) / "samples.jsonl").read_text().splitlines()]

    def by_draw(rows):
        return {(d["benchmark"], d["example_id"], d["method"], d["draw"]): (d["permutation"], d["text"]) for d in rows}

    assert len(rechunked) == len(draws)
    assert by_draw(rechunked) == by_draw(draws)
    assert len({d["text"] for d in sampled}) > 1  # sampled at temperature: the texts are not all one

    # A stop signal during meta-scoring: exit 75 after the chunk, whose scores are already in the file; the
    # rerun scores only the rest and ends with every draw once, scored as the uninterrupted run scored it.
    assert got["stop_exit_code"] == 75
    step = 2 * 4  # eval.chunk_examples=1 x max(k)=4 draws, for each of the 2 data-parallel ranks
    assert got["scored_before_stop"] == [step]
    assert got["scored_after"] and sum(got["scored_after"]) == len(sampled) - step
    scored_at_stop = [d for d in got["kept_at_stop"] if d.get("meta_score") is not None]
    assert len(scored_at_stop) == step
    final = [json.loads(line) for line in (Path(got["stopped_dir"]) / "samples.jsonl").read_text().splitlines()]
    assert len(final) == len(draws)
    reference = {(d["benchmark"], d["example_id"], d["draw"]): d["meta_score"] for d in sampled}
    finals = {(d["benchmark"], d["example_id"], d["draw"]): d["meta_score"] for d in final if d["method"] == "sample"}
    assert finals.keys() == reference.keys()
    for key, meta in finals.items():
        assert meta == pytest.approx(reference[key], abs=1e-4), key


def test_a_run_folder_refuses_draws_made_with_other_settings(tmp_path):
    from megatron_grm.stages.evaluate import MANIFEST_FILE, check_manifest

    settings = {"grm": "/ckpt/iter_0000040", "metarm": None, "temperature": 0.5, "seed": 1234}
    check_manifest(str(tmp_path), settings)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == settings
    check_manifest(str(tmp_path), dict(settings))  # the same settings: continue
    with pytest.raises(ValueError, match=r"other settings \(grm, temperature"):
        check_manifest(str(tmp_path), {**settings, "grm": "/ckpt/iter_0000080", "temperature": 1.0})


def test_examples_the_model_cannot_read_are_skipped_and_counted(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.evaluate import BenchmarkSpec, EvalSettings, load_benchmark, prompt_check

    lines = [{"id": "ok1", "context": "2+2?", "responses": ["4", "5"], "label": 0},
             {"id": "accent", "context": "caf\u00e9?", "responses": ["a", "b"], "label": 1},
             {"id": "long", "context": "x" * 900, "responses": ["a", "b"], "label": 0},
             {"id": "ok2", "context": "3+3?", "responses": ["6"], "label": 1},
             {"id": "ok3", "context": "4+4?", "responses": ["8", "9"], "label": 0}]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = EvalSettings.from_dict({"benchmarks": [{"name": "b", "data": str(path)}], "variant": "compact",
                                "chat": False, "max_new_tokens": 64, "judge_baseline": False})
    check = prompt_check(load_tokenizer("char"), s, context_limit=512)
    bench = load_benchmark(s.benchmarks[0], check, seed=0)
    assert [e.id for e in bench.examples] == ["ok1", "ok2", "ok3"]
    assert bench.skipped == {"untokenizable": 1, "too_long": 1}
    limited = load_benchmark(BenchmarkSpec("b", str(path), limit=2), check, seed=0)
    assert [e.id for e in limited.examples] == ["ok1", "ok2"]  # the first usable ones
    with pytest.raises(ValueError, match="eval.ks"):
        EvalSettings.from_dict({"benchmarks": [{"name": "b", "data": str(path)}], "ks": [0, 2]})


def _settings(data: str):
    from megatron_grm.stages.evaluate import EvalSettings

    return EvalSettings.from_dict({"benchmarks": [{"name": "b", "data": data}], "variant": "compact",
                                   "chat": False, "max_new_tokens": 16, "judge_baseline": False})


def test_bad_records_are_counted_with_the_skipped_examples(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.evaluate import load_benchmark, prompt_check

    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"id": "ok", "context": "2+2?", "responses": ["4", "5"], "label": 0}) + "\n"
                    + json.dumps({"id": "bad", "context": "2+2?", "responses": ["4", "5"], "label": 7}) + "\n"
                    + "{not json\n")
    s = _settings(str(path))
    bench = load_benchmark(s.benchmarks[0], prompt_check(load_tokenizer("char"), s, context_limit=512), seed=0)
    assert [e.id for e in bench.examples] == ["ok"]
    assert bench.skipped == {"bad_record": 2}


def test_a_repeated_example_id_across_files_is_an_error_not_shared_judgments(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.evaluate import BenchmarkSpec, load_benchmark, prompt_check

    folder = tmp_path / "Pairwise_set" / "Helpfulness"
    folder.mkdir(parents=True)
    for name, (chosen, reject) in {"a.json": ("4", "5"), "b.json": ("5", "4")}.items():
        (folder / name).write_text(json.dumps([{
            "pair_uid": "same", "conversation_input": [{"role": "user", "content": "2+2?"}],
            "chosen": {"llm_name": "m1", "answer": chosen}, "reject": {"llm_name": "m2", "answer": reject},
            "category_path": "Pairwise_set/Helpfulness/Chat"}]))
    spec = BenchmarkSpec("b", f"rmb:{tmp_path}:pairwise", files=["Helpfulness/a.json", "Helpfulness/b.json"])
    check = prompt_check(load_tokenizer("char"), _settings(str(tmp_path)), context_limit=512)
    with pytest.raises(ValueError, match=r"example id 'rmb/pairwise/same' is used by examples #0 and #1"):
        load_benchmark(spec, check, seed=0)
    one = load_benchmark(BenchmarkSpec("b", f"rmb:{tmp_path}:pairwise", files=["Helpfulness/a.json"]), check, 0)
    assert [e.id for e in one.examples] == ["rmb/pairwise/same"]


@pytest.mark.parametrize("meta", [float("nan"), "0.5", True])
def test_a_samples_file_with_a_non_finite_or_non_numeric_meta_score_names_the_line(tmp_path, meta):
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import DrawStore
    from megatron_grm.stages.evaluate import Benchmark

    path = tmp_path / "draws.jsonl"
    good = {"benchmark": "b", "example_id": "e", "method": "sample", "draw": 0, "scores": [3, 7], "meta_score": 0.5}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "draw": 1, "meta_score": meta}) + "\n")
    bench = Benchmark("b", [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="e")], Counter())
    with pytest.raises(ValueError, match=rf"{path}:2: field 'meta_score' must be a finite number"):
        DrawStore().read(str(path), [bench])


@pytest.mark.parametrize(("line", "message"), [("{truncated", "invalid JSON"), ("[1, 2]", "expected a JSON object")])
def test_a_samples_file_line_that_is_not_a_json_object_names_the_line(tmp_path, line, message):
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import DrawStore
    from megatron_grm.stages.evaluate import Benchmark

    path = tmp_path / "draws.jsonl"
    good = {"benchmark": "b", "example_id": "e", "method": "sample", "draw": 0, "scores": [3, 7], "meta_score": None}
    path.write_text(json.dumps(good) + "\n\n" + line + "\n")
    bench = Benchmark("b", [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="e")], Counter())
    with pytest.raises(ValueError, match=rf"{path}:3: {message}"):
        DrawStore().read(str(path), [bench])


def test_a_benchmark_counts_the_examples_whose_best_response_is_also_a_losing_one(tmp_path, caplog):
    from megatron_grm.stages.evaluate import BenchmarkSpec, load_benchmark

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"id": i, "context": "q", "responses": r, "label": best}) + "\n"
                            for i, r, best in [("same", ["yes ", "yes"], 0), ("fine", ["a", "b"], 1),
                                               ("bon", ["x", "y", "x"], 2), ("single", ["x"], 1)]))
    benchmark = load_benchmark(BenchmarkSpec("b", str(path)), lambda example: None, seed=0)
    assert len(benchmark.examples) == 4 and benchmark.best_identical == 2
    assert "in 2 example(s) the best response is identical to another (first: same, bon)" in caplog.text


def _draws_file(path: Path, draws) -> None:
    from dataclasses import asdict

    path.write_text("".join(json.dumps(asdict(d)) + "\n" for d in draws))


def test_a_rerun_over_fewer_examples_keeps_the_other_draws_in_the_run_file(tmp_path):
    """Evaluating only benchmark A in a folder that also holds B's draws used to rewrite samples.jsonl with
    A's alone: B's judgments were gone for good."""
    from collections import Counter

    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import SAMPLE, Draw, DrawStore, rewrite_draws
    from megatron_grm.stages.evaluate import Benchmark

    draws = [Draw(b, "e1", SAMPLE, k, [7, 3], [0, 1], f"{b} judgment {k}", 0.5) for b in ("A", "B") for k in range(2)]
    path = tmp_path / "samples.jsonl"
    _draws_file(path, draws)
    store = DrawStore()
    only_a = [Benchmark("A", [Example((Turn("user", "q"),), ("x", "y"), 0, "s", "e1")], Counter())]
    assert store.read(str(path), only_a, keep_others=True) == 2
    rewrite_draws(str(path), store.all(), store.others)
    again = DrawStore()
    both = [*only_a, Benchmark("B", only_a[0].examples, Counter())]
    assert again.read(str(path), both) == 4 and again.all() == draws


def test_imported_meta_scores_are_rescored_by_the_runs_metarm_and_an_overflowed_one_stays_json(tmp_path):
    from collections import Counter

    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import SAMPLE, Draw, DrawStore, rewrite_draws
    from megatron_grm.stages.evaluate import Benchmark

    bench = [Benchmark("A", [Example((Turn("user", "q"),), ("x", "y"), 0, "s", "e1")], Counter())]
    path = tmp_path / "imported.jsonl"
    _draws_file(path, [Draw("A", "e1", SAMPLE, 0, [7, 3], [0, 1], "j", 2.5)])
    store = DrawStore()
    store.read(str(path), bench, meta_scores=False)  # eval.metarm set: another MetaRM's logit is not reused
    assert store.all()[0].meta_score is None
    store = DrawStore()
    store.read(str(path), bench)  # eval.metarm null: the imported logits are the MetaRM scores
    assert store.all()[0].meta_score == 2.5
    store.all()[0].meta_score = float("nan")  # a low-precision overflow
    rewrite_draws(str(path), store.all())
    again = DrawStore()
    assert again.read(str(path), bench) == 1 and again.all()[0].meta_score is None  # scored again next run
    assert "NaN" not in path.read_text() and json.loads(path.read_text())["meta_score"] is None


def test_a_draw_repeated_with_another_judgment_is_an_error_naming_both_lines(tmp_path):
    """A second line of one draw used to replace the first without a word (and the rewrite dropped it)."""
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import DrawStore
    from megatron_grm.stages.evaluate import Benchmark

    path = tmp_path / "draws.jsonl"
    good = {"benchmark": "b", "example_id": "e", "method": "sample", "draw": 0, "scores": [3, 7], "meta_score": None}
    bench = [Benchmark("b", [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="e")], Counter())]
    for second, field in [({**good, "scores": [9, 1]}, "scores"), ({**good, "benchmark": "other", "text": "x"}, None)]:
        first = {**good, "benchmark": second["benchmark"]}
        path.write_text(json.dumps(first) + "\n" + json.dumps(good | {"draw": 1}) + "\n" + json.dumps(second) + "\n")
        if field is None:  # a draw of an example not evaluated here: kept for the rewrite, so checked too
            with pytest.raises(ValueError, match=rf"{path}:3: field 'text': this draw \(other, e, sample, draw 0\) "
                                                 r"is already on line 1"):
                DrawStore().read(str(path), bench, keep_others=True)
            continue
        with pytest.raises(ValueError, match=rf"{path}:3: field '{field}': .* already on line 1 with other"):
            DrawStore().read(str(path), bench)
    scored = {**good, "meta_score": 0.5}
    path.write_text(json.dumps({**good, "meta_score": 0.7}) + "\n" + json.dumps(scored) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: field 'meta_score'"):  # two MetaRM scores of one draw
        DrawStore().read(str(path), bench)


def test_a_draw_appended_again_with_its_meta_score_replaces_the_unscored_line(tmp_path):
    """What meta_score_missing appends (the same draw, now scored) and a line written twice are no conflict;
    a draw of another example is kept once, with its score, for the rewrite."""
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import DrawStore
    from megatron_grm.stages.evaluate import Benchmark

    path = tmp_path / "draws.jsonl"
    good = {"benchmark": "b", "example_id": "e", "method": "sample", "draw": 0, "scores": [3, 7], "permutation": [1, 0],
            "text": "j", "meta_score": None}
    other = {**good, "example_id": "gone"}
    bench = [Benchmark("b", [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="e")], Counter())]
    lines = [good, other, good, {**good, "meta_score": 1.5}, {**other, "meta_score": -2.0}, {**good, "meta_score": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    store = DrawStore()
    assert store.read(str(path), bench, keep_others=True) == 1
    assert [(d.draw, d.meta_score) for d in store.all()] == [(0, 1.5)]
    assert store.others == [{**other, "meta_score": -2.0}]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("draw", "1", "field 'draw' must be a non-negative integer"),  # sorted() met str and int: a TypeError
    ("draw", -1, "field 'draw' must be a non-negative integer"),
    ("draw", True, "field 'draw' must be a non-negative integer"),
    ("scores", [True, False], "field 'scores' must be a list of integers"),
    ("example_id", 7, "field 'example_id' must be a string"),
    ("permutation", [0, "1"], "field 'permutation' must be a list of integers"),
])
def test_a_samples_file_draw_with_a_mistyped_field_names_the_line_and_field(tmp_path, field, value, message):
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.stages.eval_draws import DrawStore
    from megatron_grm.stages.evaluate import Benchmark

    path = tmp_path / "draws.jsonl"
    good = {"benchmark": "b", "example_id": "e", "method": "sample", "draw": 0, "scores": [3, 7]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    bench = [Benchmark("b", [Example([Turn("user", "q")], ["a", "b"], 0, source="t", id="e")], Counter())]
    with pytest.raises(ValueError, match=rf"{path}:2: {message}"):
        DrawStore().read(str(path), bench)
