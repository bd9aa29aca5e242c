"""Optimizer steps per second of the distillation loop, from the teacher's top-k cache (the default path).

On the `pocket` preset (embedded SmolLM2-135M-Instruct teacher, 10-layer derived student, fp32 on CPU): build the
top-k cache of a small training split in a temporary folder, then train `--steps` steps from it and report steps/s
and tokens/s (the first step is a warm-up and not counted). Used to check that a change does not slow the CPU path.

    python benchmarks/train_speed.py --steps 16
    python benchmarks/train_speed.py --set train.gradient_checkpointing=true
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=16, help="training steps (the first one is a warm-up)")
    parser.add_argument("--rows", type=int, default=96, help="training rows cached (the speed does not depend on it)")
    args = parser.parse_args()

    from pocket_teacher import experiment
    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.models import load_teacher, resolve_device
    from pocket_teacher.students import load_student
    from pocket_teacher.teacher_cache import build_topk_cache
    from pocket_teacher.train import Vocab, distill

    cfg = experiment.configure(args.preset, [f"data.train_size={args.rows}", "train.eval_every=0",
                                           "train.checkpoint_every=0", *args.set, f"train.max_steps={args.steps}"])
    print(f"hardware: {hardware_line()}")
    device = resolve_device(cfg.train.device)
    raw = experiment.load_data(cfg, verbose=False)
    teacher, teacher_tok, _ = load_teacher(cfg.teacher, device)
    student, tok, _ = load_student(cfg.student, teacher, teacher_tok, device)
    splits = experiment.tokenize(cfg, raw, tok, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        cache = build_topk_cache(teacher, splits.train, root, k=cfg.teacher_cache.k, vocab_size=len(tok), progress=False)
        result = distill(student, None, splits.train, cfg, Vocab.of(tok), teacher_cache=cache, progress=False)
    h = result.history
    seconds = h[-1]["elapsed_s"] - h[0]["elapsed_s"]
    tokens = sum(r.get("answer_tokens", 0) for r in h[1:])
    print(f"{cfg.preset}: {len(h) - 1} steps after a warm-up in {seconds:.1f} s = {(len(h) - 1) / seconds:.3f} steps/s "
          f"({seconds / (len(h) - 1):.2f} s/step), batch {cfg.train.batch_size} x {cfg.train.grad_accum}, "
          f"loss {result.loss_implementation}" + (f", {tokens / seconds:,.0f} tokens/s" if tokens else ""))


if __name__ == "__main__":
    main()
