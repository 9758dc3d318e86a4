"""Two evaluation runs compared example by example (stages/eval_compare.py, tools/compare_evals.py): the
numbers from hand-made outcomes, every malformed record named by file and line, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grm.stages.eval_compare import compare_outcomes, compare_runs, comparison_markdown, read_outcomes
from tests.conftest import REPO


def write_outcomes(run: Path, cells: dict[tuple[str, str], list[bool]]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"benchmark": bench, "method": method, "example_id": f"{bench}/{i}", "correct": c})
             for (method, bench), verdicts in cells.items() for i, c in enumerate(verdicts)]
    (run / "outcomes.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_the_paired_difference_counts_the_examples_one_model_got_right(tmp_path):
    a = [True] * 30 + [False] * 10 + [True] * 5 + [False] * 5  # 35 of 50 right
    b = [True] * 30 + [True] * 10 + [False] * 5 + [False] * 5  # 40 of 50: 10 gained, 5 lost
    run_a = write_outcomes(tmp_path / "a", {("Greedy", "arith"): a, ("Voting@4", "arith"): a,
                                            ("Greedy", "only_in_a"): [True, False]})
    run_b = write_outcomes(tmp_path / "b", {("Greedy", "arith"): b, ("Voting@4", "arith"): a})
    greedy, voting = compare_runs(run_a, run_b)  # only the cells both runs have, in A's order
    assert (greedy.method, greedy.benchmark, greedy.examples) == ("Greedy", "arith", 50)
    assert (greedy.accuracy_a, greedy.accuracy_b) == (0.70, 0.80)
    assert greedy.difference == pytest.approx(0.10)
    assert (greedy.only_a, greedy.only_b) == (5, 10)
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    mean = sum(diffs) / 50
    assert greedy.standard_error == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 49 / 50))
    assert greedy.p_value == pytest.approx(sum(math.comb(15, i) for i in range(6)) / 2**15 * 2)
    # The same verdicts on both sides: no difference, no discordant example, p = 1.
    assert (voting.difference, voting.standard_error, voting.only_a, voting.only_b, voting.p_value) == (
        0.0, 0.0, 0, 0, 1.0)
    table = comparison_markdown([greedy, voting], "RFT", "GRPO")
    assert "| Greedy | arith | 50 | 70.0 | 80.0 | +10.0 ± 7.7 | 5 / 10 | 0.302 |" in table


def test_runs_on_different_examples_are_not_compared(tmp_path):
    run_a = write_outcomes(tmp_path / "a", {("Greedy", "arith"): [True, False, True]})
    run_b = write_outcomes(tmp_path / "b", {("Greedy", "arith"): [True, False]})
    with pytest.raises(ValueError, match=r"Greedy on arith: the runs judged different examples \(1 only in A"):
        compare_runs(run_a, run_b)
    run_c = write_outcomes(tmp_path / "c", {("Voting@2", "arith"): [True, False, True]})
    with pytest.raises(ValueError, match="share no"):
        compare_runs(run_a, run_c)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object, got list"),
    ('{"benchmark": "b", "method": "Greedy", "example_id": "x"}', "field 'correct' must be a bool, got None"),
    ('{"benchmark": "b", "method": "Greedy", "example_id": 7, "correct": true}', "field 'example_id' must be a str"),
    ('{"benchmark": "b", "method": "Greedy", "example_id": "b/0", "correct": true}',
     "example 'b/0' appears twice for method 'Greedy' on 'b'"),
])
def test_a_malformed_record_names_the_file_line_and_field(tmp_path, line, message):
    run = write_outcomes(tmp_path / "run", {("Greedy", "b"): [True, False]})
    with (run / "outcomes.jsonl").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=rf"outcomes\.jsonl:3: .*{message}"):
        read_outcomes(run)


def test_outcomes_of_two_cells_are_read_by_example(tmp_path):
    run = write_outcomes(tmp_path / "run", {("Greedy", "b"): [True, False], ("Voting@1", "b"): [False, False]})
    assert read_outcomes(run) == {("Greedy", "b"): {"b/0": True, "b/1": False},
                                  ("Voting@1", "b"): {"b/0": False, "b/1": False}}
    assert compare_outcomes(read_outcomes(run), read_outcomes(run))[0].difference == 0.0


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "compare_evals.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_the_command_line_prints_the_table_or_json_and_refuses_a_folder_without_outcomes(tmp_path):
    run_a = write_outcomes(tmp_path / "a", {("Greedy", "arith"): [True, False, False, True]})
    run_b = write_outcomes(tmp_path / "b", {("Greedy", "arith"): [True, True, True, True]})
    proc = run_tool(str(run_a), str(run_b), "--names", "RFT", "GRPO")
    assert proc.returncode == 0, proc.stderr
    assert "| method | benchmark | examples | RFT | GRPO | GRPO − RFT (± SE) |" in proc.stdout
    assert "| Greedy | arith | 4 | 50.0 | 100.0 | +50.0 ± 28.9 | 0 / 2 | 0.5 |" in proc.stdout
    records = json.loads(run_tool(str(run_a), str(run_b), "--json").stdout)
    assert records[0]["only_b"] == 2 and records[0]["difference"] == 0.5
    missing = run_tool(str(run_a), str(tmp_path / "nothing"))
    assert missing.returncode == 2
    assert "outcomes.jsonl: no such file" in missing.stderr
