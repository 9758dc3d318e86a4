"""The evaluation's figure: accuracy against the number of sampled judgments k (paper Figure 1's axes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plot_scaling(curves: Mapping[str, Any], path: str, title: str = "Inference-time scaling") -> None:
    """Overall accuracy (%) vs. k on a log2 axis: a line each for Voting@k and MetaRM@k; Greedy and the
    LLM-as-a-judge baseline, which do not scale with k, as horizontal reference lines. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    ks = list(curves["k"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, marker in (("Voting", "o"), ("MetaRM", "s")):
        if label in curves:
            ax.plot(ks, [100 * v for v in curves[label]], marker=marker, label=f"{label}@k")
    for label, style in (("Greedy", "--"), ("LLM-as-a-judge", ":")):
        if label in curves:
            ax.axhline(100 * curves[label], linestyle=style, color="grey", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (sampled judgments per example)")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
