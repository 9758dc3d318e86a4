"""Several evaluations on one figure (stages/plots.py, tools/plot.py): which curves are read from each
run's results.json, what is drawn, and the errors for a run that cannot be read. The curves of a real
evaluation folder are checked in test_evaluate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grm.stages.plots import plot_runs, read_scaling
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, voting: list[float], greedy: float, metarm: list[float] | None = None,
              ks: tuple[int, ...] = (1, 2, 4)) -> Path:
    """A results.json with the fields the evaluate stage writes and the plot reads."""
    accuracy = {"Greedy": {"arith": greedy, "other": 0.5}}
    scaling: dict = {"k": list(ks), "Voting": voting, "Greedy": greedy}
    for k, v in zip(ks, voting):
        accuracy[f"Voting@{k}"] = {"arith": v, "other": 0.5}
    if metarm is not None:
        scaling["MetaRM"] = metarm
        for k, v in zip(ks, metarm):
            accuracy[f"MetaRM@{k}"] = {"arith": v}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"accuracy": accuracy, "scaling": scaling}))
    return folder


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_each_run_gets_its_lines_and_runs_with_other_ks_share_the_axis(tmp_path):
    a = read_scaling(write_run(tmp_path / "a", [0.5, 0.6, 0.7], 0.55, metarm=[0.5, 0.65, 0.75]))
    b = read_scaling(write_run(tmp_path / "b", [0.6, 0.8], 0.7, ks=(1, 8)))
    drawn = plot_runs({"A": a, "B": b}, str(tmp_path / "fig.png"))
    assert set(drawn) == {"A Voting@k", "A MetaRM@k", "A Greedy", "B Voting@k", "B Greedy"}
    assert drawn["A MetaRM@k"] == ([1, 2, 4], pytest.approx([50.0, 65.0, 75.0]))
    assert drawn["B Voting@k"] == ([1, 8], pytest.approx([60.0, 80.0]))
    assert drawn["B Greedy"] == ([1, 2, 4, 8], pytest.approx([70.0] * 4))  # across every k of the figure
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_SIGNATURE
    one = plot_runs({"": a}, str(tmp_path / "one.png"))  # the evaluate stage's own figure
    assert set(one) == {"Voting@k", "MetaRM@k", "Greedy"}


def test_a_benchmark_is_rebuilt_from_the_accuracy_table_at_the_same_ks(tmp_path):
    run = write_run(tmp_path / "a", [0.5, 0.6, 0.7], 0.55, metarm=[0.5, 0.65, 0.75])
    assert read_scaling(run, "arith") == {"k": [1, 2, 4], "Voting": [0.5, 0.6, 0.7], "MetaRM": [0.5, 0.65, 0.75],
                                          "Greedy": 0.55}
    assert read_scaling(run, "other") == {"k": [1, 2, 4], "Voting": [0.5] * 3, "Greedy": 0.5}  # no MetaRM there


@pytest.mark.parametrize(("results", "message"), [
    ("{not json", r"results.json:1: invalid JSON"),
    (json.dumps({"scaling": {"Voting": [0.5]}}), r"field 'scaling.k' is missing"),
    (json.dumps({"scaling": {"k": [1, 2], "Voting": [0.5]}}), r"'scaling' Voting: expected 2 fractions .* \[0.5\]"),
    (json.dumps({"scaling": {"k": [1], "Voting": [50.0]}}), r"'scaling' Voting: expected 1 fractions"),
    (json.dumps({"scaling": {"k": [1], "Greedy": [0.5]}}), r"'scaling' Greedy: expected a fraction"),
    (json.dumps({"scaling": {"k": [1]}}), r"holds no method to plot"),
])
def test_a_malformed_results_file_is_named_with_its_field(tmp_path, results, message):
    (tmp_path / "results.json").write_text(results)
    with pytest.raises(ValueError, match=message):
        read_scaling(tmp_path)


def test_a_missing_benchmark_names_the_ones_there(tmp_path):
    run = write_run(tmp_path / "a", [0.5, 0.6, 0.7], 0.55)
    with pytest.raises(ValueError, match=r"no benchmark 'rmb' \(it has \['arith', 'other'\]\)"):
        read_scaling(run, "rmb")
    with pytest.raises(FileNotFoundError, match="results.json: no such file"):
        read_scaling(tmp_path / "missing")


def test_the_command_line_prints_what_it_plots_and_exits_2_on_a_bad_run(tmp_path):
    a = write_run(tmp_path / "rft", [0.5, 0.6, 0.7], 0.55)
    b = write_run(tmp_path / "grpo", [0.6, 0.65, 0.8], 0.6, metarm=[0.6, 0.7, 0.85])
    out = tmp_path / "scaling.png"
    done = run_tool(str(a), str(b), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "| line | k=1 | k=2 | k=4 |" in done.stdout
    assert "| grpo MetaRM@k | 60.0 | 70.0 | 85.0 |" in done.stdout  # folder names label the runs
    assert "| rft Greedy | 55.0 | 55.0 | 55.0 |" in done.stdout
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    bad = run_tool(str(a), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "nowhere/results.json: no such file" in bad.stderr
    assert not (tmp_path / "x.png").exists()
    assert run_tool(str(a), str(b), "--names", "only-one").returncode == 2
