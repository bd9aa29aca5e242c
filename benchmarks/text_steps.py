"""How many steps does the pocket-text student need? Held-out perplexity on teacher text along one longer run.

    python benchmarks/text_steps.py                     # pocket-text, 600 steps, scored every 50
    python benchmarks/text_steps.py --steps 40 --every 10 --preset tiny-text

Reuses the preset's teacher texts and teacher cache (runs/teacher_cache; built first when absent), distils the
pruned student for --steps steps (the preset's batch, learning rate and loss; the cosine schedule spans --steps)
and prints the held-out perplexity every --every steps beside the teacher's, with the ratio the issue's target is
stated in (student / teacher), the epochs over the training texts and the elapsed training time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket-text")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    from pocket_teacher.evaluate import perplexity
    from pocket_teacher.experiment import Experiment, configure
    from pocket_teacher.runfolder import hardware_line

    cfg = configure(args.preset, ["eval.baseline=false", *args.set])
    exp = Experiment(cfg, progress=False)
    for section in ("load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
        getattr(exp, section)()
    teacher = perplexity(exp.teacher, exp.splits.eval, pad_token_id=exp.tokenizer.pad_token_id,
                         vocab_size=len(exp.tokenizer), progress=False)["perplexity"]
    trained = exp.distil([f"train.max_steps={args.steps}", f"train.eval_every={args.every}",
                          "train.checkpoint_every=0"])
    rows = len(exp.splits.train)
    batch = trained.cfg.train.batch_size * trained.cfg.train.grad_accum
    print(f"\n{hardware_line()}\n{args.preset}: {rows} training texts, {len(exp.splits.eval)} held out; teacher "
          f"perplexity {teacher:.2f}; {args.steps} steps of {batch} texts, lr {trained.cfg.train.lr:g}, "
          f"alpha {trained.cfg.loss.alpha}, T {trained.cfg.loss.temperature}\n")
    print("| step | epochs | held-out perplexity | x teacher | training s |")
    print("| --- | --- | --- | --- | --- |")
    for row in trained.result.history:
        if row.get("eval_ppl") is not None:
            print(f"| {row['step']} | {row['step'] * batch / rows:.1f} | {row['eval_ppl']:.2f} | "
                  f"{row['eval_ppl'] / teacher:.2f} | {row['elapsed_s']:.0f} |")


if __name__ == "__main__":
    main()
