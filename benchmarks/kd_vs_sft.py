"""When does distilling beat plain fine-tuning, and by how much? Six ways to train the same student, several seeds.

    python benchmarks/kd_vs_sft.py                    # pocket preset, 3 seeds, every method (about an hour on 2 cores)
    python benchmarks/kd_vs_sft.py --quick            # 1 seed, 8 steps, small evaluation: checks the path (minutes)
    python benchmarks/kd_vs_sft.py --steps 100 --seeds 0 1 2 3 4

Methods, all from the same untrained student (the pocket preset's 10 of the teacher's 30 layers), the same training
questions, the same optimizer, schedule and number of optimizer steps:

- SFT: loss.alpha=1, cross-entropy on the reference answers;
- hybrid KD: alpha=0.5, T=2, forward KL to the teacher's top-64 cache;
- pure KD: alpha=0, T=2;
- sequence-level KD: CE on the teacher's own greedy answers to the first --seq-questions training questions, only the
  correct ones when at least one global batch of them is correct, else all of them (said in the output);
- on-policy KD: train.on_policy=1, the student samples its answers (at most 64 tokens) and the live teacher scores
  every token, reverse KL at T=1 (the usual on-policy choice);
- mixed: train.on_policy=0.5, every other step on-policy, the others off-policy from the cache (same loss settings).

Then SFT again at the wall time of the best KD method (training time plus the teacher's cost: the cache build for
methods that read it, the answers' generation for sequence-level KD).

Metrics per run: held-out answer perplexity in distribution (gsm_symbolic, --eval-rows) and out of distribution
(real GSM8K test answers from ../shared/data, first --ood-rows; skipped without it), top-1 agreement and KL to the
teacher on the in-distribution answers, GSM accuracy on the first --accuracy-questions held-out questions (greedy).
Mean and 95% t-interval over seeds (perplexity: geometric mean, the interval taken in log space). Against SFT two
intervals of the difference in log-perplexity: a paired bootstrap over the same items (per-item NLL averaged over
seeds: how sure the difference is for these seeds) and a paired t-interval over seeds (each seed's difference: how
sure it is across training runs, the unit a claim about the method needs). results.json keeps every run's row.
Each run's figures are kept in <out>/rows/, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ON_POLICY = {"loss.divergence": "reverse_kl", "loss.temperature": 1.0, "loss.alpha": 0.5,
             "train.rollout_max_new_tokens": 64}
METHODS = {
    "SFT": {"loss.alpha": 1.0},
    "hybrid KD": {"loss.alpha": 0.5, "loss.temperature": 2.0},
    "pure KD": {"loss.alpha": 0.0, "loss.temperature": 2.0},
    "sequence-level KD": {"loss.alpha": 1.0},
    "on-policy KD": {**ON_POLICY, "train.on_policy": 1.0},
    "mixed (on_policy=0.5)": {**ON_POLICY, "train.on_policy": 0.5},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (the interval is the mean alone for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_bootstrap(a: list[float], b: list[float], weights: list[float] | None = None, draws: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Difference of (weighted) means of `a` and `b` over the same items, with a 95% bootstrap interval."""
    n = len(a)
    w = weights or [1.0] * n
    rng = random.Random(seed)

    def diff(idx):
        tw = sum(w[i] for i in idx)
        return (sum(a[i] for i in idx) - sum(b[i] for i in idx)) / tw

    point = diff(range(n))
    stats = sorted(diff([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return point, stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1]


def evaluate_run(model, tokenizer, teacher, splits: dict, args) -> dict:
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.evaluate import agreement, gsm8k_accuracy, perplexity

    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    row = {}
    for name, split in splits.items():
        ppl = perplexity(model, split, pad_token_id=pad, vocab_size=vocab, batch_size=16, progress=False, per_row=True)
        row[name] = {"perplexity": ppl["perplexity"], "row_nll": ppl["row_nll"], "row_tokens": ppl["row_tokens"]}
    agree = agreement(teacher, model, splits["in distribution"], pad_token_id=pad, vocab_size=vocab, progress=False)
    row.update(top1_agreement=agree["top1_agreement"], kl_to_teacher=agree["kl"])
    if args.accuracy_questions:
        acc = gsm8k_accuracy(model, tokenizer, splits["in distribution"].examples[:args.accuracy_questions],
                             GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=16), progress=False)
        row.update(accuracy=acc["accuracy"], correct_rows=[int(r["correct"]) for r in acc["rows"]])
    return row


def prepare(args):
    """The pocket experiment up to the teacher cache, the OOD split and the sequence-level KD split."""
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.data import LoadReport, load_gsm8k, tokenize_examples
    from pocket_teacher.generate import generate_answers
    from pocket_teacher.experiment import Experiment, cache_dir, configure

    overrides = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0",
                 "train.save_final=false", "eval.baseline=false", f"run.out_dir={args.out}", "run.name=prepare",
                 f"teacher_cache.dir={args.cache}", f"data.eval_size={args.eval_rows}",
                 f"generate.max_new_tokens={args.max_new_tokens}"]
    exp = Experiment(configure("pocket", overrides), progress=True)
    for step in ("load_data", "load_teacher", "load_student", "build_cache"):
        getattr(exp, step)()
    splits = {"in distribution": exp.splits.eval}
    ood = SHARED / "gsm8k" / "test.jsonl"
    if ood.is_file():
        examples, report = load_gsm8k("test", path=str(ood), limit=args.ood_rows)
        splits["out of distribution (GSM8K test)"] = tokenize_examples(examples, exp.tokenizer, 512, "skip",
                                                                       None, report)
        print(f"data: {report}")
    else:
        print("out of distribution: ../shared/data/gsm8k/test.jsonl is not here; skipped")
    costs = {"cache_build_s": exp.cache.report.build_seconds if exp.cache else 0.0}
    costs_file = Path(args.out) / "teacher_costs.json"
    if "sequence-level KD" not in args.methods:
        costs_file.parent.mkdir(parents=True, exist_ok=True)
        costs_file.write_text(json.dumps({**costs, "seq_answers_s": 0.0}))
        return exp, splits, None, "not run", costs
    start = time.perf_counter()
    questions = exp.raw.train[:args.seq_questions]
    greedy = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    kept, report = generate_answers(exp.teacher, exp.teacher_tokenizer, questions, cache_dir(exp.cfg), greedy,
                                    keep="correct", progress=True)
    seq_note = f"the {report.kept} correct teacher answers of {report.rows}"
    if report.kept < exp.cfg.train.batch_size:
        kept, report = generate_answers(exp.teacher, exp.teacher_tokenizer, questions, cache_dir(exp.cfg), greedy,
                                        keep="all", progress=False)
        seq_note = (f"all {report.kept} non-empty teacher answers of {report.rows} (too few were correct to filter: "
                    f"fewer than one batch)")
    if report.status == "generated" or not costs_file.is_file():
        costs["seq_answers_s"] = time.perf_counter() - start
    else:
        costs["seq_answers_s"] = json.loads(costs_file.read_text()).get("seq_answers_s", 0.0)
    costs_file.parent.mkdir(parents=True, exist_ok=True)
    costs_file.write_text(json.dumps(costs))
    seq_split = tokenize_examples(kept, exp.tokenizer, exp.cfg.data.max_length, "skip", None,
                                  LoadReport(source="teacher answers", rows=len(kept)))
    print(f"sequence-level KD trains on {seq_note}; {len(seq_split)} rows fit data.max_length")
    return exp, splits, seq_split, seq_note, costs


def train_one(exp, method: str, overrides: dict, seed: int, steps: int, seq_split, args) -> dict:
    """Train one student (method, seed, steps) and evaluate it; cached in <out>/rows/."""
    from pocket_teacher.config import apply_overrides
    from pocket_teacher.experiment import Splits, train_student

    tag = f"{method.replace(' ', '_').replace('(', '').replace(')', '').replace('=', '')}-s{seed}-n{steps}"
    path = Path(args.out) / "rows" / f"{tag}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = apply_overrides(exp.cfg, {**overrides, "train.seed": seed, "train.max_steps": steps, "run.name": tag,
                                    "run.out_dir": str(Path(args.out) / "runs")})
    seq = method == "sequence-level KD"
    splits = Splits(seq_split if seq else exp.splits.train, exp.splits.eval)
    uses_teacher = cfg.loss.alpha < 1 and not seq
    student, result = train_student(cfg, exp.student_init, exp.teacher if uses_teacher else None, splits,
                                    exp.tokenizer, progress=False, cache=exp.cache if uses_teacher else None)
    row = {"method": method, "seed": seed, "steps": steps, "train_s": result.seconds,
           "rollout_tokens_mean": _mean([h["rollout_tokens_mean"] for h in result.history
                                         if h.get("rollout_tokens_mean") is not None]),
           **evaluate_run(student, exp.tokenizer, exp.teacher, args.splits, args)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    print(f"{method:24s} seed {seed} steps {steps}: " + ", ".join(
        f"{k} ppl {v['perplexity']:.3f}" for k, v in row.items() if isinstance(v, dict))
          + f", agreement {row['top1_agreement']:.3f}, {row['train_s']:.0f} s", flush=True)
    return row


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], split_names: list[str]) -> dict:
    """Per method: mean and interval of each metric over seeds; paired bootstrap against SFT on the same items."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    sft = by_method.get("SFT")
    for method, runs in by_method.items():
        entry = {"seeds": len(runs), "train_s": mean_ci([r["train_s"] for r in runs]),
                 "steps": runs[0]["steps"]}
        for name in split_names:  # perplexities average in log space (a geometric mean and its interval)
            entry[name] = tuple(math.exp(x) for x in mean_ci([math.log(r[name]["perplexity"]) for r in runs]))
        for key in ("top1_agreement", "kl_to_teacher", "accuracy"):
            if all(r.get(key) is not None for r in runs):
                entry[key] = mean_ci([r[key] for r in runs])
        if sft and method != "SFT":
            paired = {r["seed"]: r for r in sft}
            same = [r for r in runs if r["seed"] in paired]  # the seed is the unit: one difference per seed
            for name in split_names if len(same) >= 2 else ():  # one seed has no interval over seeds
                entry[f"{name}: delta log-ppl vs SFT, seeds"] = mean_ci(
                    [math.log(r[name]["perplexity"]) - math.log(paired[r["seed"]][name]["perplexity"]) for r in same])
            for name in split_names:
                a = [sum(r[name]["row_nll"][i] for r in runs) / len(runs) for i in range(len(runs[0][name]["row_nll"]))]
                b = [sum(r[name]["row_nll"][i] for r in sft) / len(sft) for i in range(len(a))]
                entry[f"{name}: delta log-ppl vs SFT"] = paired_bootstrap(a, b, runs[0][name]["row_tokens"])
            if all("correct_rows" in r for r in runs + sft):
                a = [sum(r["correct_rows"][i] for r in runs) / len(runs) for i in range(len(runs[0]["correct_rows"]))]
                b = [sum(r["correct_rows"][i] for r in sft) / len(sft) for i in range(len(a))]
                entry["accuracy delta vs SFT"] = paired_bootstrap(a, b)
        out[method] = entry
    return out


def table(summary: dict, split_names: list[str]) -> str:
    head = ["method", "seeds", "steps", *[f"perplexity {n}" for n in split_names], "top-1 agreement",
            "KL to teacher", "accuracy", *[f"Δ log-ppl vs SFT, {n}: items / seeds" for n in split_names], "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def ci(t, pct=False, digits=2):
        if t is None:
            return "-"
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.{digits}f}")
        return f"{f(t[0])} ({f(t[1])} to {f(t[2])})"

    for method, e in summary.items():
        deltas = [f"{ci(e.get(f'{n}: delta log-ppl vs SFT'), digits=3)} / "
                  f"{ci(e.get(f'{n}: delta log-ppl vs SFT, seeds'), digits=3)}" if method != "SFT" else "-"
                  for n in split_names]  # "-" after the slash: one seed, no interval over seeds
        cells = [method, str(e["seeds"]), str(e["steps"]), *[ci(e[n]) for n in split_names],
                 ci(e.get("top1_agreement"), True), ci(e.get("kl_to_teacher")), ci(e.get("accuracy"), True),
                 *deltas, f"{e['train_s'][0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(rows: list[dict]) -> list[dict]:
    """Each run's figures without its per-item lists: the rows the seed-level intervals are computed from."""
    return [{k: ({"perplexity": v["perplexity"]} if isinstance(v, dict) else v) for k, v in r.items()
             if k not in ("correct_rows",)} for r in rows]


def figure(summary: dict, rows: list[dict], split_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, f"perplexity, {n}", False) for n in split_names] + [("top1_agreement", "top-1 agreement", True),
                                                                       ("kl_to_teacher", "KL to teacher (nats)", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    methods = list(summary)
    for ax, (key, label, pct) in zip(axes, panels):
        for i, m in enumerate(methods):
            e = summary[m].get(key)
            if e is None:
                continue
            mean, lo, hi = e
            ax.bar(i, mean, color="tab:grey" if m.startswith("SFT") else "tab:blue", alpha=0.6)
            ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=4)
            seeds = [r[key]["perplexity"] if isinstance(r.get(key), dict) else r.get(key)
                     for r in rows if r["method"] == m]
            ax.plot([i] * len(seeds), seeds, "k.", ms=5)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if key in split_names:  # log scale; a collapsed method (a cold on-policy start) is written, not drawn
            ax.set_yscale("log")
            means = [summary[m][key][0] for m in methods if summary[m].get(key)]
            sane = [v for v in means if v < 1e4] or means
            top = 4 * max(sane)
            ax.set_ylim(min(sane) / 2, top)
            for i, m in enumerate(methods):
                if summary[m].get(key) and summary[m][key][0] > top:
                    ax.text(i, top / 1.6, f"{summary[m][key][0]:.0e}", ha="center", va="top", rotation=90, fontsize=8)
        if pct:
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def summarize_kept(args, hardware: str) -> None:
    """Table, figure and results.json from the rows a finished (or interrupted) benchmark kept in <out>/rows."""
    import glob

    from pocket_teacher.files import write_json

    rows = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(Path(args.out) / "rows" / "*.json")))]
    equal = [r for r in rows if r["steps"] != args.steps]
    rows = [r for r in rows if r["steps"] == args.steps]
    names = [k for k, v in rows[0].items() if isinstance(v, dict)]
    summary = summarize(rows, names)
    costs = json.loads((Path(args.out) / "teacher_costs.json").read_text())
    kd = {m: e for m, e in summary.items() if m != "SFT"}
    best = min(kd, key=lambda m: kd[m]["in distribution"][0])
    equal_time = None
    if equal:
        teacher_cost = costs["seq_answers_s"] if best == "sequence-level KD" else (
            0.0 if best == "on-policy KD" else costs["cache_build_s"])
        label = f"SFT at the wall time of {best}"
        rows += [dict(r, method=label) for r in equal]
        summary = summarize(rows, names)
        equal_time = {"best_kd": best, "kd_wall_s": kd[best]["train_s"][0] + teacher_cost,
                      "teacher_cost_s": teacher_cost, "sft_steps": equal[0]["steps"],
                      "sft_s_per_step": summary["SFT"]["train_s"][0] / args.steps}
    order = [m for m in METHODS if m in summary] + [m for m in summary if m not in METHODS]
    summary = {m: summary[m] for m in order}
    text = table(summary, names)
    fig = figure(summary, rows, names, f"pocket preset, {args.steps} steps, {len({r['seed'] for r in rows})} seeds "
                                       f"per method; {hardware.split(';')[0]}")
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    settings = {k: v for k, v in vars(args).items() if k != "splits"}
    settings.update(seeds=sorted({r["seed"] for r in rows}), methods=[m for m in METHODS if m in summary])
    write_json(Path(args.out) / "results.json", {"hardware": hardware, "settings": settings, "steps": args.steps,
                                                 "teacher_costs_s": costs, "equal_wall_time": equal_time,
                                                 "summary": summary, "per_seed": per_seed(rows)})
    print(text)
    if equal_time:
        print(f"equal wall time: best KD by in-distribution perplexity: {best}, {equal_time['kd_wall_s']:.0f} s with "
              f"the teacher's cost ({equal_time['teacher_cost_s']:.0f} s); SFT at {equal_time['sft_s_per_step']:.2f} "
              f"s/step gets {equal_time['sft_steps']} steps in that time")
    print(f"figure: {args.figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every method (equal steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out gsm_symbolic rows (in distribution)")
    parser.add_argument("--ood-rows", type=int, default=64, help="real GSM8K test rows (out of distribution)")
    parser.add_argument("--accuracy-questions", type=int, default=32, help="held-out questions answered (0 skips)")
    parser.add_argument("--seq-questions", type=int, default=200, help="training questions the teacher answers")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-equal-time", action="store_true", help="skip SFT at the best KD method's wall time")
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 steps, small OOD and accuracy sets: checks the path")
    parser.add_argument("--out", default="runs/kd_vs_sft")
    parser.add_argument("--cache", default="runs/teacher_cache", help="teacher cache folder (shared with the demo)")
    parser.add_argument("--figure", default="figures/kd_vs_sft.png")
    parser.add_argument("--summarize-only", action="store_true",
                        help="no training: the table, figure and results.json from the runs kept in <out>/rows")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.ood_rows = 8, [0], 16  # eval rows kept: the demo's teacher cache fits
        args.accuracy_questions, args.seq_questions, args.max_new_tokens = 4, 16, 64
        args.out, args.figure = args.out + "-quick", str(Path(args.out + "-quick") / "kd_vs_sft.png")

    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.files import write_json

    began = time.perf_counter()
    hardware = hardware_line()
    print(hardware)
    if args.summarize_only:
        summarize_kept(args, hardware)
        return
    exp, splits, seq_split, seq_note, costs = prepare(args)
    args.splits = splits
    rows = [train_one(exp, m, METHODS[m], s, args.steps, seq_split, args) for m in args.methods for s in args.seeds]
    names = list(splits)
    summary = summarize(rows, names)
    equal_time = None
    kd = {m: e for m, e in summary.items() if m != "SFT"}
    if not args.no_equal_time and "SFT" in summary and kd:
        best = min(kd, key=lambda m: kd[m]["in distribution"][0])
        teacher_cost = costs["seq_answers_s"] if best == "sequence-level KD" else (
            0.0 if best == "on-policy KD" else costs["cache_build_s"])
        wall = kd[best]["train_s"][0] + teacher_cost
        sft_step = summary["SFT"]["train_s"][0] / summary["SFT"]["steps"]
        steps = max(args.steps, round(wall / sft_step))
        label = f"SFT at the wall time of {best}"
        rows += [dict(train_one(exp, "SFT", METHODS["SFT"], s, steps, seq_split, args), method=label)
                 for s in args.seeds]
        summary = summarize(rows, names)
        equal_time = {"best_kd": best, "kd_wall_s": wall, "teacher_cost_s": teacher_cost, "sft_steps": steps,
                      "sft_s_per_step": sft_step}
    text = table(summary, names)
    title = (f"pocket preset, {args.steps} steps, seeds {args.seeds}; {hardware.split(';')[0]}")
    fig = figure(summary, rows, names, title)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    wall = time.perf_counter() - began
    write_json(Path(args.out) / "results.json", {
        "hardware": hardware, "settings": {k: v for k, v in vars(args).items() if k != "splits"},
        "sequence_level_data": seq_note, "teacher_costs_s": costs, "equal_wall_time": equal_time,
        "summary": summary, "per_seed": per_seed(rows), "wall_s": wall})
    print(f"\n{hardware}\npocket preset, {args.steps} optimizer steps per method, seeds {args.seeds}; "
          f"sequence-level KD on {seq_note}")
    print(text)
    if equal_time:
        print(f"equal wall time: the best KD method by in-distribution perplexity is {equal_time['best_kd']}: "
              f"{equal_time['kd_wall_s']:.0f} s with the teacher's cost ({equal_time['teacher_cost_s']:.0f} s); "
              f"SFT at {equal_time['sft_s_per_step']:.2f} s/step gets {equal_time['sft_steps']} steps in that time")
    print(f"figure: {args.figure}; benchmark wall time {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
