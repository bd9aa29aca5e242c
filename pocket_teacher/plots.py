"""Figures as matplotlib Figure objects: the caller decides to show or save them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure  # a bare Figure needs no backend and never pops up a window

COLOURS = {"teacher": "#4C72B0", "student before": "#C44E52", "student after": "#55A868"}


def _colour(label: str) -> str:
    return COLOURS.get(label, "#8172B2")


def plot_quality(results: Sequence[dict], title: str = "") -> Figure:
    """Perplexity (log scale) and GSM accuracy (with 95% intervals) bars, one bar per model."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_ppl, ax_acc = fig.subplots(1, 2)
    labels = [r["model"] for r in results]
    colours = [_colour(label) for label in labels]
    ppl = [r["perplexity"] for r in results]
    bars = ax_ppl.bar(labels, ppl, color=colours)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylim(top=max(ppl) * 8)  # room for the value labels
    ax_ppl.set_ylabel("perplexity (log scale, lower is better)")
    ax_ppl.bar_label(bars, labels=[f"{v:,.2f}" if v < 1000 else f"{v:,.0f}" for v in ppl], padding=2)
    ax_ppl.set_title("Perplexity on held-out answers")
    if all("accuracy" in r for r in results):
        acc = [100 * r["accuracy"] for r in results]
        err = [[100 * (r["accuracy"] - r["ci95_low"]) for r in results],
               [100 * (r["ci95_high"] - r["accuracy"]) for r in results]]
        ticks = [f"{r['model']}\n{r['correct']}/{r['questions']} right" for r in results]
        ax_acc.bar(ticks, acc, color=colours, yerr=err, capsize=4)
        ax_acc.set_ylim(0, max(10.0, max(100 * r["ci95_high"] for r in results) * 1.1))
        ax_acc.set_ylabel("accuracy % (95% Wilson interval)")
        ax_acc.set_title("GSM-style accuracy (greedy, exact final number)")
    else:
        ax_acc.set_axis_off()
        ax_acc.text(0.5, 0.5, "accuracy not evaluated", ha="center", va="center")
    for ax in (ax_ppl, ax_acc):
        ax.tick_params(axis="x", labelrotation=10)
    if title:
        fig.suptitle(title)
    return fig


def plot_training(history: Sequence[dict], title: str = "") -> Figure:
    """Training curves: total loss, CE and KD per optimizer step, with the learning rate."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, ax_lr = fig.subplots(1, 2, width_ratios=[3, 1])
    steps = [h["step"] for h in history]
    for key, style in (("loss", "-"), ("ce", "--"), ("kd", ":")):
        ax.plot(steps, [h[key] for h in history], style, label={"loss": "total", "ce": "CE (hard labels)",
                                                              "kd": "KD (T² · KL)"}[key])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Distillation loss")
    ax_lr.plot(steps, [h["lr"] for h in history], color="grey")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, *paths: str | Path, dpi: int = 120) -> list[Path]:
    """Save `fig` to each path (folders created); returns the paths written."""
    written = []
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written
