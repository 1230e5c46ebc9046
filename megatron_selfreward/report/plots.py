"""The report's PNG plots (matplotlib, Agg backend: no display needed on a cluster node).

Each function draws one figure from already-collected numbers and returns the PNG path, or
None when there is nothing to draw (the report then says what is missing instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and never tries a GUI backend
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["RM_METRICS", "score_histograms", "pairs_per_iteration", "reward_model_metrics_plot",
           "head_to_head_plot", "training_loss", "stage_times"]

# (metrics.json key, label) of the five Table 4 metrics.
RM_METRICS = (("pairwise_accuracy", "pairwise acc."), ("five_best_frac", "5-best"),
              ("exact_match_frac", "exact match"), ("spearman_mean", "Spearman"),
              ("kendall_tau_b_mean", "Kendall tau"))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def _grouped_bars(ax: Any, groups: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def score_histograms(hists: dict[int, dict[str, int]], path: Path) -> Path | None:
    """Rounded mean judge score -> count, one bar series per iteration."""
    if not hists:
        return None
    buckets = sorted({b for h in hists.values() for b in h}, key=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _grouped_bars(ax, buckets, {f"iter{n}": [h.get(b, 0) for b in buckets] for n, h in sorted(hists.items())})
    ax.set_xlabel("mean judge score (rounded)")
    ax.set_ylabel("responses")
    ax.set_title("Self-judged scores per iteration")
    return _save(fig, path)


def pairs_per_iteration(counts: dict[int, dict[str, int | None]], path: Path) -> Path | None:
    """Prompts and preference pairs per iteration."""
    if not counts:
        return None
    iters = sorted(counts)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _grouped_bars(ax, [f"iter{n}" for n in iters],
                  {"prompts": [counts[n].get("prompts") or 0 for n in iters],
                   "pairs": [counts[n].get("pairs") or 0 for n in iters]})
    ax.set_ylabel("count")
    ax.set_title("Preference pairs (AIFT) per iteration")
    return _save(fig, path)


def reward_model_metrics_plot(per_model: dict[str, dict[str, float | None]], path: Path,
                              reference: dict[str, dict[str, float]] | None = None) -> Path | None:
    """The five Table 4 metrics (k-sample mean), one bar series per model (None drawn as 0);
    `reference` (the paper's numbers) as markers over each group."""
    if not per_model:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _grouped_bars(ax, [label for _, label in RM_METRICS],
                  {name: [m.get(key) or 0.0 for key, _ in RM_METRICS] for name, m in per_model.items()})
    for (name, values), marker in zip((reference or {}).items(), "v^os"):
        ax.scatter(range(len(RM_METRICS)), [values[key] for key, _ in RM_METRICS], marker=marker,
                   facecolors="none", edgecolors="black", zorder=3, label=f"paper {name} (70B)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_ylim(min(-0.1, *(m.get(key) or 0.0 for m in per_model.values() for key, _ in RM_METRICS)), 1.0)
    ax.set_title("Reward-model metrics on the EFT eval split (k-sample mean)")
    ax.axhline(0, color="black", linewidth=0.5)
    return _save(fig, path)


def head_to_head_plot(rows: dict[str, dict[str, int]], path: Path) -> Path | None:
    """Stacked win / tie / loss / unjudged counts per comparison."""
    if not rows:
        return None
    names = list(rows)
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.5))
    left = [0.0] * len(names)
    for outcome, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red"),
                           ("unjudged", "lightgray")):
        values = [rows[n].get(outcome, 0) for n in names]
        ax.barh(names, values, left=left, color=color, label=outcome)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("comparisons")
    ax.legend(fontsize=8, ncol=4)
    ax.set_title("Head-to-head against the previous model")
    return _save(fig, path)


def training_loss(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path | None:
    """Loss against step, one line per training run (SFT and DPO losses differ in scale, so
    each run gets its own panel)."""
    if not curves:
        return None
    fig, axes = plt.subplots(len(curves), 1, figsize=(6, 2.4 * len(curves)), squeeze=False)
    for ax, (label, (steps, losses)) in zip(axes[:, 0], curves.items()):
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("loss")
    axes[-1, 0].set_xlabel("step")
    return _save(fig, path)


def stage_times(times: list[tuple[str, float]], path: Path) -> Path | None:
    """Wall time of every stage with a manifest."""
    if not times:
        return None
    labels = [label for label, _ in times]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(times) + 1.2))
    ax.barh(labels, [t for _, t in times])
    ax.invert_yaxis()  # run order, top to bottom
    ax.set_xlabel("wall time (s)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("Time per stage")
    return _save(fig, path)
