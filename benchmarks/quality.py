"""Full GSM8K test and MMLU test accuracy of any model, with the time each took.

    python benchmarks/quality.py --model embedded                 # the SmolLM2-135M-Instruct teacher
    python benchmarks/quality.py --model runs/pocket/student      # a saved student
    python benchmarks/quality.py --model Qwen/Qwen2.5-1.5B-Instruct --precision 8bit --batch-size 64   # on a GPU
    python benchmarks/quality.py --gsm8k-rows 100 --mmlu-rows 500 --speed-check 16    # a quick look

GSM8K: zero-shot (or --gsm8k-shots k from the train split), batched greedy generation, exact match
of the final number. MMLU: standard prompt, zero-shot (or --mmlu-shots k, shots from the same
subject's other test questions unless --mmlu-shots-from gives a dev file), answer-letter scoring;
micro and macro averages and per-subject figures. Data from ../shared/data when present, else the
Hub (or --gsm8k / --mmlu paths). --speed-check N answers N GSM8K questions batched and one at a
time, in the same run, and prints the seconds per question of each. Every question's row goes to
--out as JSONL, the figures to results.json there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _default(path: Path):
    return str(path) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help='"embedded", a saved folder, a .gguf or a Hub id')
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16, 8bit, 4bit")
    parser.add_argument("--gsm8k", default=_default(SHARED / "gsm8k" / "test.jsonl"), help="GSM8K test JSONL")
    parser.add_argument("--gsm8k-train", default=_default(SHARED / "gsm8k" / "train.jsonl"),
                        help="where --gsm8k-shots come from")
    parser.add_argument("--gsm8k-rows", type=int, default=0, help="first N test rows (0 = all 1,319)")
    parser.add_argument("--speed-tokens", type=int, default=128, help="new tokens per answer in --speed-check")
    parser.add_argument("--gsm8k-shots", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--mmlu", default=_default(SHARED / "mmlu" / "test.jsonl"), help="MMLU test JSONL")
    parser.add_argument("--mmlu-rows", type=int, default=0, help="N test rows, a sample stratified by subject (seed 0; 0 = all 14,042)")
    parser.add_argument("--mmlu-sample", type=int, default=0,
                        help="score an evenly spaced sample of about N questions (every subject represented)")
    parser.add_argument("--mmlu-shots", type=int, default=0)
    parser.add_argument("--mmlu-shots-from", default=None, help="MMLU dev JSONL for the shots")
    parser.add_argument("--skip", choices=["gsm8k", "mmlu"], action="append", default=[])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--speed-check", type=int, default=0, help="GSM8K questions answered batched vs one by one")
    parser.add_argument("--out", default="runs/quality", help="folder for rows (JSONL) and results.json")
    args = parser.parse_args()

    import torch

    from pocket_teacher.config import GenerateConfig, TeacherConfig
    from pocket_teacher.data import load_gsm8k, load_mmlu
    from pocket_teacher.evaluate import gsm8k_accuracy, mmlu_accuracy
    from pocket_teacher.models import load_teacher, resolve_device
    from pocket_teacher.files import write_json
    from pocket_teacher.runfolder import hardware_line

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    print(f"hardware: {hardware_line()}", flush=True)
    model, tok, info = load_teacher(TeacherConfig(source=args.model, precision=args.precision), device)
    print(info, flush=True)
    summary = {"model": args.model, "info": str(info), "hardware": hardware_line(), "args": vars(args)}

    def save() -> None:
        write_json(out / "results.json", summary)

    def record(name: str, res: dict, label: str, detail: str, **extra) -> None:
        """Every question's row to <name>.jsonl, the figures to results.json, one line to the console."""
        with (out / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in res["rows"])
        summary[name] = {k: v for k, v in res.items() if k != "rows"} | extra
        low, high = res["ci95"]
        print(f"{label} {100 * res['accuracy']:.2f}% ({res['correct']}/{res['total']}, 95% CI {100 * low:.2f}-"
              f"{100 * high:.2f}){detail}; in {res['seconds']:.0f} s ({res['seconds'] / max(1, res['total']):.3f} "
              "s/question)", flush=True)
        save()

    if args.speed_check:
        questions, _ = load_gsm8k("test", path=args.gsm8k, limit=args.speed_check)
        batched = gsm8k_accuracy(model, tok, questions, GenerateConfig(
            max_new_tokens=args.speed_tokens, batch_size=min(args.batch_size, len(questions))), progress=False)
        single = gsm8k_accuracy(model, tok, questions, GenerateConfig(max_new_tokens=args.speed_tokens, batch_size=1),
                                progress=False)
        agree = sum(a["output"] == b["output"] for a, b in zip(batched["rows"], single["rows"]))
        per_b, per_s = batched["seconds"] / len(questions), single["seconds"] / len(questions)
        summary["speed_check"] = {"questions": len(questions), "batched_s_per_question": per_b,
                                  "single_s_per_question": per_s, "speedup": per_s / per_b,
                                  "same_outputs": agree}
        print(f"speed check on {len(questions)} GSM8K questions, {args.speed_tokens} new tokens at most: batched "
              f"(batch {min(args.batch_size, len(questions))}) {per_b:.2f} s/question, one at a time {per_s:.2f} "
              f"s/question: {per_s / per_b:.1f}x; identical outputs {agree}/{len(questions)}", flush=True)
        save()

    if "mmlu" not in args.skip:
        questions, report = load_mmlu("test", path=args.mmlu, limit=args.mmlu_rows or None)
        print(f"data: {report}", flush=True)
        if args.mmlu_sample and args.mmlu_sample < len(questions):
            step = len(questions) / args.mmlu_sample
            questions = [questions[int(i * step)] for i in range(args.mmlu_sample)]
            print(f"MMLU sample: {len(questions)} questions, every {step:.1f}th of the file, "
                  f"{len({q.subject for q in questions})} subjects", flush=True)
        pool = load_mmlu("dev", path=args.mmlu_shots_from)[0] if args.mmlu_shots_from else None
        res = mmlu_accuracy(model, tok, questions, shots=args.mmlu_shots, shot_pool=pool, batch_size=args.batch_size)
        letters = ", ".join(f"{k} {100 * v / max(1, res['total']):.1f}%" for k, v in res["predicted_letters"].items())
        record("mmlu", res, f"MMLU ({res['shots']}-shot, letter scoring): micro",
               f", macro over {len(res['per_subject'])} subjects {100 * res['macro']:.2f}%; predicted letters "
               f"{letters}; always answering {res['favourite_letter']} would score "
               f"{100 * res['favourite_letter_accuracy']:.2f}%")

    if "gsm8k" not in args.skip:
        questions, report = load_gsm8k("test", path=args.gsm8k, limit=args.gsm8k_rows or None)
        print(f"data: {report}", flush=True)
        shots = load_gsm8k("train", path=args.gsm8k_train, limit=args.gsm8k_shots)[0] if args.gsm8k_shots else ()
        res = gsm8k_accuracy(model, tok, questions, GenerateConfig(max_new_tokens=args.max_new_tokens,
                                                                  batch_size=args.batch_size), shots=shots)
        no_number = sum(r["extracted"] is None for r in res["rows"])
        record("gsm8k", res, f"GSM8K ({len(shots)}-shot, greedy, {args.max_new_tokens} new tokens):",
               f"; {no_number} outputs without a number", no_number=no_number)
    del torch


if __name__ == "__main__":
    main()
