"""Our evaluator against EleutherAI's lm-evaluation-harness on the same model and the same items.

    pip install lm-eval==0.4.13                            # optional: not part of the core install
    python benchmarks/lm_eval_parity.py                    # MMLU letter + cloze, 10 questions per subject (570)
    python benchmarks/lm_eval_parity.py --per-subject 0    # the full 14,042-question MMLU test (our side only
                                                           # when lm-eval is absent)
    python benchmarks/lm_eval_parity.py --gsm8k 50         # also GSM8K 5-shot (lm_eval mode) on 50 test questions

Items: MMLU from ../shared/data/mmlu/test.jsonl, the first --per-subject questions of each subject in file order;
GSM8K from ../shared/data/gsm8k. Our side: `mmlu_accuracy` (letter), `mmlu_cloze_accuracy` (acc, acc_norm) and
`gsm8k_accuracy(fewshot="lm_eval")`. lm-eval's side: the task configs shipped in lm_eval_tasks/ pointed at the same
items (written to a temporary folder), run through `lm_eval.simple_evaluate` on the same weights (the embedded
teacher's save_pretrained folder), with per-sample logs. Printed: both accuracies, and per-item agreement of the
predicted answers. Without lm-eval installed only our side runs (and says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def mmlu_subset(path: Path, per_subject: int) -> list[dict]:
    """The first `per_subject` rows of each subject, in file order (0 = every row)."""
    rows, seen = [], {}
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: rows hold U+2028 and friends
        if not line.strip():
            continue
        row = json.loads(line)
        seen[row["subject"]] = seen.get(row["subject"], 0) + 1
        if not per_subject or seen[row["subject"]] <= per_subject:
            rows.append(row)
    return rows


def write_tasks(folder: Path, mmlu_file: Path, gsm8k_train: Path, gsm8k_test: Path) -> None:
    """The shipped lm_eval_tasks/ configs, their data files pointed at the chosen items."""
    import yaml

    for name in ("pocket_mmlu", "pocket_mmlu_continuation", "pocket_gsm8k"):
        config = yaml.safe_load((ROOT / "lm_eval_tasks" / f"{name}.yaml").read_text())
        files = {"test": str(mmlu_file)} if "mmlu" in name else {"train": str(gsm8k_train), "test": str(gsm8k_test)}
        config["dataset_kwargs"] = {"data_files": files}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def run_lm_eval(model_dir: Path, tasks: list[str], include: Path, batch_size: int, limit: int | None) -> dict:
    """lm-eval's results and per-sample logs for `tasks` on the model folder (CPU, fp32)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                                  task_manager=TaskManager(include_path=str(include)), batch_size=batch_size,
                                  device="cpu", log_samples=True, limit=limit)
    return out


def _pred(sample: dict, norm: bool, choices: list[str] | None = None) -> int:
    lls = [r[0] for r in sample["filtered_resps"]]
    if norm:
        lls = [ll / len(c) for ll, c in zip(lls, choices)]
    return max(range(len(lls)), key=lls.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help='"embedded" or a save_pretrained folder')
    parser.add_argument("--per-subject", type=int, default=10, help="MMLU questions per subject (0 = all)")
    parser.add_argument("--gsm8k", type=int, default=0, help="GSM8K test questions, 5-shot (0 skips)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/lm_eval_parity")
    args = parser.parse_args()

    import importlib.util

    import torch

    from pocket_teacher.config import GenerateConfig, TeacherConfig
    from pocket_teacher.data import load_gsm8k, mmlu_example
    from pocket_teacher.evaluate import gsm8k_accuracy, mmlu_accuracy, mmlu_cloze_accuracy
    from pocket_teacher.models import load_teacher, materialize_gguf
    from pocket_teacher.runfolder import hardware_line

    torch.manual_seed(0)
    print(hardware_line())
    if args.model == "embedded":
        from pocket_teacher.models import embedded_gguf_path

        model_dir = materialize_gguf(embedded_gguf_path())
    else:
        model_dir = Path(args.model)
    model, tok, info = load_teacher(TeacherConfig(source=str(model_dir)), "cpu", precision="fp32")
    print(info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = mmlu_subset(SHARED / "mmlu" / "test.jsonl", args.per_subject)
    examples = [mmlu_example(r, f"test.jsonl#{i}") for i, r in enumerate(rows)]
    print(f"MMLU: {len(examples)} questions ({args.per_subject or 'all'} per subject, file order)")
    report = {"hardware": hardware_line(), "model": str(model_dir), "questions": len(examples), "args": vars(args)}
    start = time.perf_counter()
    letter = mmlu_accuracy(model, tok, examples, batch_size=args.batch_size, desc="ours: letter")
    report["ours_letter_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cloze = mmlu_cloze_accuracy(model, tok, examples, batch_size=args.batch_size, desc="ours: cloze")
    report["ours_cloze_s"] = time.perf_counter() - start
    report["ours"] = {"letter_acc": letter["accuracy"], "cloze_acc": cloze["accuracy"],
                      "cloze_acc_norm": cloze["accuracy_norm"], "favourite_letter": letter["favourite_letter"],
                      "favourite_letter_share": letter["predicted_letters"][letter["favourite_letter"]] / len(examples)}
    print(f"ours: letter acc {100 * letter['accuracy']:.1f}% ({report['ours_letter_s']:.0f} s), cloze acc "
          f"{100 * cloze['accuracy']:.1f}%, acc_norm {100 * cloze['accuracy_norm']:.1f}% ({report['ours_cloze_s']:.0f} s)")
    gsm = None
    if args.gsm8k:
        train, _ = load_gsm8k("train", path=str(SHARED / "gsm8k" / "train.jsonl"))
        test, _ = load_gsm8k("test", path=str(SHARED / "gsm8k" / "test.jsonl"), limit=args.gsm8k)
        start = time.perf_counter()
        gsm = gsm8k_accuracy(model, tok, test, GenerateConfig(max_new_tokens=256, batch_size=args.batch_size),
                             shots=train, fewshot="lm_eval", num_fewshot=5, desc="ours: GSM8K 5-shot")
        report["ours_gsm8k"] = {k: gsm[k] for k in ("accuracy", "strict_match", "flexible_extract")}
        report["ours_gsm8k_s"] = time.perf_counter() - start
        print(f"ours: GSM8K 5-shot (lm_eval mode) on {len(test)}: our extractor {100 * gsm['accuracy']:.1f}%, "
              f"strict-match {100 * gsm['strict_match']:.1f}%, flexible-extract {100 * gsm['flexible_extract']:.1f}%")
    if importlib.util.find_spec("lm_eval") is None:
        print("lm-eval is not installed (pip install lm-eval==0.4.13): only our side ran.")
        (out / "parity.json").write_text(json.dumps(report, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subset = tmp / "mmlu.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_tasks(tmp, subset, SHARED / "gsm8k" / "train.jsonl", SHARED / "gsm8k" / "test.jsonl")
        start = time.perf_counter()
        res = run_lm_eval(model_dir, ["pocket_mmlu", "pocket_mmlu_continuation"], tmp, args.batch_size, None)
        report["lm_eval_mmlu_s"] = time.perf_counter() - start
        samples = {name: sorted(res["samples"][name], key=lambda s: s["doc_id"])
                   for name in ("pocket_mmlu", "pocket_mmlu_continuation")}
        theirs_letter = [_pred(s, False) for s in samples["pocket_mmlu"]]
        theirs_cloze = [_pred(s, False) for s in samples["pocket_mmlu_continuation"]]
        theirs_norm = [_pred(s, True, rows[s["doc_id"]]["choices"]) for s in samples["pocket_mmlu_continuation"]]
        ours_letter = ["ABCD".index(r["predicted"]) for r in letter["rows"]]
        ours_cloze = ["ABCD".index(r["predicted"]) for r in cloze["rows"]]
        ours_norm = ["ABCD".index(r["predicted_norm"]) for r in cloze["rows"]]
        agree = {name: sum(a == b for a, b in zip(x, y)) / len(x) for name, x, y in (
            ("letter", ours_letter, theirs_letter), ("cloze acc", ours_cloze, theirs_cloze),
            ("cloze acc_norm", ours_norm, theirs_norm))}
        metrics = res["results"]
        report["lm_eval"] = {"letter_acc": metrics["pocket_mmlu"]["acc,none"],
                             "cloze_acc": metrics["pocket_mmlu_continuation"]["acc,none"],
                             "cloze_acc_norm": metrics["pocket_mmlu_continuation"]["acc_norm,none"]}
        report["per_item_agreement"] = agree
        print(f"lm-eval {report['lm_eval_mmlu_s']:.0f} s: letter acc {100 * report['lm_eval']['letter_acc']:.1f}%, "
              f"cloze acc {100 * report['lm_eval']['cloze_acc']:.1f}%, acc_norm "
              f"{100 * report['lm_eval']['cloze_acc_norm']:.1f}%")
        print("per-item agreement of the predicted answer: " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in agree.items()))
        if gsm is not None:
            res = run_lm_eval(model_dir, ["pocket_gsm8k"], tmp, args.batch_size, args.gsm8k)
            theirs = sorted(res["samples"]["pocket_gsm8k"], key=lambda s: s["doc_id"])
            outputs = [s["resps"][0][0] for s in theirs]
            # ours is stripped of surrounding whitespace (lm-eval keeps the space after "Answer:"): compare stripped
            same = sum(a.strip() == b["output"].strip() for a, b in zip(outputs, gsm["rows"])) / len(outputs)
            report["gsm8k_pairs"] = [{"ours": b["output"], "lm_eval": a} for a, b in zip(outputs, gsm["rows"])]
            m = res["results"]["pocket_gsm8k"]
            report["lm_eval_gsm8k"] = {"strict_match": m["exact_match,strict-match"],
                                       "flexible_extract": m["exact_match,flexible-extract"],
                                       "identical_outputs": same}
            print(f"lm-eval GSM8K: strict-match {100 * m['exact_match,strict-match']:.1f}%, flexible-extract "
                  f"{100 * m['exact_match,flexible-extract']:.1f}%; identical generated text on {100 * same:.0f}% "
                  f"of questions")
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    print(f"written {out / 'parity.json'}")


if __name__ == "__main__":
    main()
