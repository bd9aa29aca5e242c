"""The report of a run: the results table (a DataFrame and its markdown), the answers side by side, the
preflight's warnings and the summary in plain sentences. Pure functions of the results rows; nothing here runs a
model or writes a file."""

from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

from .config import Config
from .data import Example
from .train import TrainResult
from .versions import require

BASELINE_LABEL = "fine-tuned (alpha=1)"
RANDOM_INIT_LABEL = "random init (same shape)"
# per-question data, kept out of the tables
DETAIL_KEYS = ("generations", "mmlu_rows", "mmlu_per_subject", "mmlu_cloze_rows", "mmlu_cloze_per_subject")


def results_table(rows: Sequence[dict]):
    """A pandas DataFrame of the results rows (per-question details left out), one model per row."""
    require("pandas", "the results table")
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in DETAIL_KEYS} for r in rows]).set_index("model")
    for column in ("parameters", "parameters_no_embeddings"):
        if column in table:
            table[column] = (table[column] / 1e6).round(1)
    return table.rename(columns={"parameters": "params (M)", "parameters_no_embeddings": "params w/o emb. (M)"})


def results_markdown(rows: Sequence[dict]) -> str:
    """The headline figures as a markdown table: accuracies with their 95% intervals."""
    lines = ["| model | params (M) | perplexity | GSM accuracy (95% CI) | MMLU letter (95% CI) | MMLU cloze acc_norm "
             "(95% CI) | top-1 agreement | latency ms/token | tokens/s (batch 16) |", "|" + " --- |" * 9]

    def pct(r: dict, key: str, low: str, high: str, extra: str = "") -> str:
        return "-" if r.get(key) is None else f"{100 * r[key]:.1f}% ({100 * r[low]:.1f}-{100 * r[high]:.1f}){extra}"

    for r in rows:
        gsm = pct(r, "accuracy", "ci95_low", "ci95_high", f", {r.get('correct')}/{r.get('questions')}")
        mmlu = pct(r, "mmlu", "mmlu_ci95_low", "mmlu_ci95_high", f", n={r.get('mmlu_questions')}")
        cloze = pct(r, "mmlu_cloze_norm", "mmlu_cloze_ci95_low", "mmlu_cloze_ci95_high",
                    f", n={r.get('mmlu_cloze_questions')}")
        agree = "-" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.1f}%"
        lat = "-" if r.get("latency_ms_per_token") is None else f"{r['latency_ms_per_token']:.1f}"
        tps = "-" if r.get("tokens_per_s_b16") is None else f"{r['tokens_per_s_b16']:.0f}"
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f} | {r['perplexity']:,.2f} | {gsm} | {mmlu} | "
                     f"{cloze} | {agree} | {lat} | {tps} |")
    return "\n".join(lines)


def side_by_side(examples: Sequence[Example], answers: dict[str, Sequence[str]]):
    """A DataFrame with each question, its gold answer, and each model's answer."""
    require("pandas", "the side-by-side table")
    return pd.DataFrame({"question": [e.question for e in examples], "gold": [e.answer for e in examples],
                         **{name: list(texts) for name, texts in answers.items()}})


def preflight_warnings(results: dict[str, dict], gap: Optional[dict]) -> list[str]:
    """Plain warnings when the teacher has little to give the student (from the rows of section 5)."""
    teacher, before = results["teacher"], results["student before"]
    warnings = []
    if teacher["perplexity"] >= 0.9 * before["perplexity"]:
        warnings.append(f"the teacher's held-out perplexity ({teacher['perplexity']:,.2f}) is not clearly below the "
                        f"untrained student's ({before['perplexity']:,.2f}): there is little for it to transfer.")
    if teacher.get("accuracy") is not None and teacher["ci95_high"] < 0.2:
        warnings.append(f"the teacher solves {teacher['correct']}/{teacher['questions']} held-out problems (95% "
                        f"interval up to {100 * teacher['ci95_high']:.0f}%): its distributions can transfer fluency "
                        f"and style, not correct answers; expect fine-tuning on the reference answers to match it "
                        f"on accuracy.")
    if before.get("top1_agreement") is not None and before["top1_agreement"] > 0.9:
        warnings.append(f"the untrained student already agrees with the teacher on "
                        f"{100 * before['top1_agreement']:.0f}% of held-out tokens.")
    # the on-policy reverse KL per token is E_q[log q - log p]: student log-likelihood minus the teacher's
    if gap and gap["student_logprob_per_token"] - gap["teacher_logprob_per_token"] < 0.1:
        warnings.append("the teacher finds the student's own samples about as likely as the student does: "
                        "on-policy distillation has little to correct.")
    return warnings


def summarize(results: dict[str, dict], cfg: Config, train_result: Optional[TrainResult],
              divergence: Optional[str] = None) -> str:
    """Plain sentences on what the results say: the student against the teacher, before and after, against
    the fine-tuned baseline, with the intervals that decide whether an accuracy difference means anything.
    `divergence` names a divergence function the training used in place of loss.divergence."""
    teacher, before, after = (results.get(k) for k in ("teacher", "student before", "student after"))
    base, random_init = results.get(BASELINE_LABEL), results.get(RANDOM_INIT_LABEL)
    if not (teacher and before and after):
        return "Run every section first: the summary compares the teacher and the student before and after."
    lines = [f"Setting: {cfg.preset} preset, {cfg.train.max_steps} steps, loss.alpha={cfg.loss.alpha}, "
             f"T={cfg.loss.temperature}, {divergence or cfg.loss.divergence}."]
    ratio = after["parameters"] / teacher["parameters"]
    lines.append(f"The student has {after['parameters'] / 1e6:.1f}M parameters, {100 * ratio:.0f}% of the teacher's "
                 f"{teacher['parameters'] / 1e6:.1f}M.")
    text = cfg.data.source in ("text", "teacher_text")
    lines.append(f"Held-out {'text (every token)' if text else 'answer'} perplexity: teacher "
                 f"{teacher['perplexity']:,.2f}; student {before['perplexity']:,.2f} before and "
                 f"{after['perplexity']:,.2f} after training ({after['perplexity'] / teacher['perplexity']:.2f}x the "
                 f"teacher's).")
    if random_init:
        better = "the pruned start" if after["perplexity"] < random_init["perplexity"] else "the random start"
        lines.append(f"The same student from random init reaches {random_init['perplexity']:,.2f} with the same data "
                     f"and steps: {better} ends lower (one seed).")
    if base:
        better = "distillation" if after["perplexity"] < base["perplexity"] else "plain fine-tuning"
        lines.append(f"Plain fine-tuning with the same steps reaches {base['perplexity']:,.2f}: {better} is lower "
                     f"on this metric (one seed; see benchmarks/ for several).")
    if after.get("top1_agreement") is not None and before.get("top1_agreement") is not None:
        text = (f"Top-1 agreement with the teacher: {100 * before['top1_agreement']:.1f}% before, "
                f"{100 * after['top1_agreement']:.1f}% after")
        if base and base.get("top1_agreement") is not None:
            text += f", {100 * base['top1_agreement']:.1f}% for plain fine-tuning"
        lines.append(text + ".")
    if after.get("accuracy") is not None:
        overlap = after["ci95_low"] <= teacher["ci95_high"] and teacher["ci95_low"] <= after["ci95_high"]
        lines.append(f"GSM accuracy: teacher {100 * teacher['accuracy']:.1f}% ({teacher['correct']}/"
                     f"{teacher['questions']}), student after {100 * after['accuracy']:.1f}% ({after['correct']}/"
                     f"{after['questions']}); the 95% intervals "
                     + ("overlap, so this sample cannot tell them apart." if overlap else "do not overlap."))
    if train_result is not None and train_result.collapsed:
        lines.append(f"WARNING: the student collapsed ({train_result.collapsed}).")
    return "\n".join(lines)
