"""Accuracy against the number of sampled judgments k (paper Figure 1's axes): one evaluation's figure
(written by the evaluate stage) or several evaluations on one figure (``tools/plot.py``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCALED = ("Voting", "MetaRM")  # methods with one accuracy per k: table rows "Voting@k", "MetaRM@k"
FLAT = ("Greedy", "LLM-as-a-judge")  # methods that do not scale with k: one accuracy, a horizontal line


def plot_scaling(curves: Mapping[str, Any], path: str, title: str = "Inference-time scaling") -> None:
    """One evaluation: a line each for Voting@k and MetaRM@k; Greedy and the LLM-as-a-judge baseline as
    horizontal reference lines. Writes a PNG."""
    plot_runs({"": curves}, path, title)


def plot_runs(runs: Mapping[str, Mapping[str, Any]], path: str, title: str = "Inference-time scaling",
              ylabel: str = "overall accuracy (%)") -> dict[str, tuple[list[int], list[float]]]:
    """Accuracy (%) vs. k on a log2 axis for each run (name → curves as in ``results.json``'s
    ``scaling``). With several runs each has its colour, and the method its line style; one unnamed run
    keeps the single-evaluation look. Writes a PNG; returns every plotted line (label → k values, %)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    ks = sorted({k for curves in runs.values() for k in curves["k"]})
    single = len(runs) == 1
    fig, ax = plt.subplots(figsize=(6, 4) if single else (7, 4.5), dpi=120)
    drawn: dict[str, tuple[list[int], list[float]]] = {}
    for index, (name, curves) in enumerate(runs.items()):
        colour = f"C{index}"
        prefix = f"{name} " if name else ""
        for method, marker, style in zip(SCALED, ("o", "s"), ("-", "--")):
            if method in curves:
                xs, ys = list(curves["k"]), [100 * v for v in curves[method]]
                ax.plot(xs, ys, marker=marker, linestyle="-" if single else style,
                        color=None if single else colour, label=f"{prefix}{method}@k")
                drawn[f"{prefix}{method}@k"] = (xs, ys)
        for method, style in zip(FLAT, ("--" if single else ":", ":" if single else "-.")):
            if method in curves:
                y = 100 * curves[method]
                ax.axhline(y, linestyle=style, color="grey" if single else colour, label=f"{prefix}{method}")
                drawn[f"{prefix}{method}"] = (ks, [y] * len(ks))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (sampled judgments per example)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8 if single else 7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return drawn


def read_scaling(run_dir: str | Path, benchmark: str | None = None) -> dict[str, Any]:
    """An evaluation run's curves from its ``results.json``: the overall ones (``scaling``), or one
    benchmark's, rebuilt from the ``accuracy`` table at the same k. A missing or malformed file or field
    is an error naming the file and the field."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (megatron_grm.stages.evaluate writes it)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    scaling = results.get("scaling") if isinstance(results, dict) else None
    ks = scaling.get("k") if isinstance(scaling, dict) else None
    if not (isinstance(ks, list) and ks and all(isinstance(k, int) and k > 0 for k in ks)):
        raise ValueError(f"{path}: field 'scaling.k' is missing or not a list of positive integers")
    if benchmark is None:
        curves = {"k": ks, **{m: scaling[m] for m in (*SCALED, *FLAT) if m in scaling}}
        where = "scaling"
    else:
        accuracy = results.get("accuracy")
        if not isinstance(accuracy, dict):
            raise ValueError(f"{path}: field 'accuracy' is missing or not a table")
        bad = [row for row, cells in accuracy.items() if not isinstance(cells, dict)]
        if bad:
            raise ValueError(f"{path}: field 'accuracy' row {bad[0]!r} is not a table of benchmarks")
        names = sorted({b for cells in accuracy.values() for b in cells})
        if benchmark not in names:
            raise ValueError(f"{path}: field 'accuracy' has no benchmark {benchmark!r} (it has {names})")
        curves = {"k": ks}
        for method in SCALED:
            values = [accuracy.get(f"{method}@{k}", {}).get(benchmark) for k in ks]
            if all(v is not None for v in values):
                curves[method] = values
        for method in FLAT:
            if accuracy.get(method, {}).get(benchmark) is not None:
                curves[method] = accuracy[method][benchmark]
        where = f"accuracy[*][{benchmark!r}]"
    for method, value in curves.items():
        per_k = isinstance(value, list) and len(value) == len(ks) and all(map(_fraction, value))
        if method in SCALED and not per_k:
            raise ValueError(f"{path}: field '{where}' {method}: expected {len(ks)} fractions (one per k), "
                             f"got {value!r}")
        if method in FLAT and not _fraction(value):
            raise ValueError(f"{path}: field '{where}' {method}: expected a fraction, got {value!r}")
    if len(curves) == 1:
        raise ValueError(f"{path}: field '{where}' holds no method to plot (Voting, MetaRM, Greedy, LLM-as-a-judge)")
    return curves


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
