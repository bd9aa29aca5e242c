"""Teacher vs saved student on real GSM8K test answers: answer-token perplexity and greedy accuracy.

The demo trains and evaluates on offline GSM-Symbolic problems; this checks the same models on the real
GSM8K test split (from ../shared/data, a local JSONL, or the Hub), printing the figures and the hardware.

    python benchmarks/gsm8k_heldout.py --student runs/pocket/student --rows 200 --generate 50
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from pocket_teacher.config import GenerateConfig, TeacherConfig
from pocket_teacher.data import load_gsm8k, tokenize_examples
from pocket_teacher.evaluate import gsm8k_accuracy, perplexity
from pocket_teacher.models import load_teacher

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/pocket/student", help="save_pretrained folder of the student")
    parser.add_argument("--data", default=str(SHARED) if SHARED.is_file() else None,
                        help="GSM8K test JSONL (default ../shared/data/gsm8k/test.jsonl, else the Hub)")
    parser.add_argument("--rows", type=int, default=200, help="test rows for perplexity (first N)")
    parser.add_argument("--generate", type=int, default=50, help="test rows answered by greedy generation")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    print(f"hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
    examples, report = load_gsm8k("test", path=args.data, limit=args.rows)
    print(f"data: {report}")
    teacher, tokenizer, info = load_teacher(TeacherConfig(source="embedded"), "cpu")
    print(info)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    split = tokenize_examples(examples, tokenizer, args.max_length, "skip")
    print(f"tokens: {split.report}; {split.answer_tokens:,} answer tokens")
    figures = {}
    for name, model in (("teacher", teacher), ("student", student)):
        start = time.perf_counter()
        ppl = perplexity(model, split, pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size)
        row = {"perplexity": ppl["perplexity"], "perplexity_s": time.perf_counter() - start}
        if args.generate:
            acc = gsm8k_accuracy(model, tokenizer, split.examples[:args.generate],
                                 GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
            row.update(accuracy=acc["accuracy"], correct=acc["correct"], questions=acc["total"],
                       ci95=acc["ci95"], generation_s=acc["seconds"])
        figures[name] = row
        print(name, json.dumps(row))
    print(f"student / teacher perplexity: {figures['student']['perplexity'] / figures['teacher']['perplexity']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
