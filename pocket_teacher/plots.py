"""Figures as matplotlib Figure objects: the caller decides to show or save them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure  # a bare Figure needs no backend and never pops up a window

from .files import replacing
from .versions import require

COLOURS = {"teacher": "#4C72B0", "student before": "#C44E52", "student after": "#55A868",
           "fine-tuned (alpha=1)": "#DD8452", "random init (same shape)": "#8172B3"}


def _figure(width: float, height: float, title: str = "") -> Figure:
    require("matplotlib", "the plots")
    fig = Figure(figsize=(width, height), layout="constrained")
    if title:
        fig.suptitle(title)
    return fig


def _colour(label: str) -> str:
    return COLOURS.get(label, "#8172B2")


def plot_quality(results: Sequence[dict], title: str = "") -> Figure:
    """Perplexity (log scale) and GSM accuracy (with 95% intervals) bars, one bar per model."""
    fig = _figure(10, 4, title)
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
    return fig


def _values(history: Sequence[dict], key: str) -> list[float]:
    return [math.nan if h.get(key) is None else h[key] for h in history]


def plot_training(history: Sequence[dict], title: str = "", baseline: Optional[Sequence[dict]] = None,
                  baseline_label: str = "fine-tuned (alpha=1)") -> Figure:
    """Training curves: total loss, CE and KD per optimizer step, with the learning rate.

    `baseline`: the history of a plain fine-tuning run (alpha = 1), drawn in grey: its CE, and its KD
    (measured without gradient) when a teacher signal was available."""
    fig = _figure(10, 4, title)
    ax, ax_lr = fig.subplots(1, 2, width_ratios=[3, 1])
    steps = [h["step"] for h in history]
    for key, style, name in (("loss", "-", "total"), ("ce", "--", "CE (hard labels)"), ("kd", ":", "KD (T² · D)")):
        if any(h.get(key) is not None for h in history):
            ax.plot(steps, _values(history, key), style, label=name)
    evals = [h for h in history if h.get("eval_ce") is not None]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_ce"] for h in evals], "o-", ms=4, label="held-out CE")
        if any(h.get("eval_kd") is not None for h in evals):
            ax.plot([h["step"] for h in evals], _values(evals, "eval_kd"), "s:", ms=4, label="held-out KD")
    if baseline:
        b_steps = [h["step"] for h in baseline]
        ax.plot(b_steps, _values(baseline, "ce"), "--", color="grey", label=f"{baseline_label}: CE")
        if any(h.get("kd") is not None for h in baseline):
            ax.plot(b_steps, _values(baseline, "kd"), ":", color="grey", label=f"{baseline_label}: KD")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Distillation loss")
    ax_lr.plot(steps, [h["lr"] for h in history], color="grey")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate")
    return fig


def save_figure(fig: Figure, *paths: str | Path, dpi: int = 120) -> list[Path]:
    """Save `fig` to each path (folders created, each file written beside it and renamed into place, so a full disk
    leaves an earlier figure whole); returns the paths written."""
    written = [Path(p) for p in paths]
    for path in written:
        with replacing(path, 1 << 20) as tmp:
            fig.savefig(tmp, dpi=dpi)
    return written


def plot_size_quality(results: Sequence[dict], x: str = "parameters", title: str = "") -> Figure:
    """Quality against cost, one point per model: perplexity and GSM accuracy (95% interval) against
    parameters (millions) or, with ``x="latency"``, generation latency (ms per token, batch 1)."""
    key, xlabel = {"parameters": ("parameters", "parameters (millions)"),
                   "latency": ("latency_ms_per_token", "generation latency (ms/token, batch 1)")}[x]
    rows = [r for r in results if r.get(key) is not None]
    scale = 1e-6 if key == "parameters" else 1.0
    fig = _figure(10, 4, title)
    ax_ppl, ax_acc = fig.subplots(1, 2)
    for r in rows:
        xs = r[key] * scale
        ax_ppl.scatter(xs, r["perplexity"], color=_colour(r["model"]), s=60, label=r["model"])
        ax_ppl.annotate(r["model"], (xs, r["perplexity"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if r.get("accuracy") is not None:
            err = [[100 * (r["accuracy"] - r["ci95_low"])], [100 * (r["ci95_high"] - r["accuracy"])]]
            ax_acc.errorbar(xs, 100 * r["accuracy"], yerr=err, fmt="o", color=_colour(r["model"]), capsize=4)
            ax_acc.annotate(r["model"], (xs, 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5),
                            fontsize=8)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("held-out answer perplexity (log, lower is better)")
    ax_acc.set_ylabel("GSM accuracy % (95% interval)")
    for ax, what in ((ax_ppl, "Perplexity"), (ax_acc, "Accuracy")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.set_title(f"{what} vs {'size' if x == 'parameters' else 'latency'}")
    return fig


def plot_mmlu_subjects(results: Sequence[dict], title: str = "") -> Figure:
    """Per-subject MMLU accuracy (95% intervals) of each model that has it, subjects sorted by the
    first model's accuracy; the dashed line is chance (25%)."""
    rows = [r for r in results if r.get("mmlu_per_subject")]
    if not rows:
        raise ValueError("No results row has MMLU per-subject figures (set eval.mmlu_source).")
    subjects = sorted(rows[0]["mmlu_per_subject"], key=lambda s: rows[0]["mmlu_per_subject"][s]["accuracy"])
    height = max(3.0, 0.22 * len(subjects) * len(rows) / 1.5)
    fig = _figure(8, height)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        ys = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(subjects))]
        stats = [r["mmlu_per_subject"].get(s) for s in subjects]
        acc = [100 * st["accuracy"] if st else math.nan for st in stats]
        err = [[100 * (st["accuracy"] - st["ci95"][0]) if st else 0 for st in stats],
               [100 * (st["ci95"][1] - st["accuracy"]) if st else 0 for st in stats]]
        ax.barh(ys, acc, height=width, xerr=err, color=_colour(r["model"]), capsize=2, error_kw={"lw": 0.6},
                label=f"{r['model']}: {100 * r['mmlu']:.1f}% micro, {100 * r['mmlu_macro']:.1f}% macro")
    ax.axvline(25, ls="--", color="grey", lw=1)
    ax.set_yticks(range(len(subjects)), [s.replace("_", " ") for s in subjects], fontsize=7)
    ax.set_xlabel("MMLU accuracy % (95% Wilson interval); dashed: chance")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "MMLU by subject")
    return fig
