"""What checkpointing costs: seconds per checkpoint, its size, and its share of training time.

On the `pocket` preset (embedded teacher, 10-layer student, teacher from the top-k cache, fp32 on
CPU), in one run: train --steps steps without checkpoints, then the same steps with a checkpoint
every --every steps (student weights, AdamW state, RNG states, history; written to a
temporary folder, checksummed, fsync'ed and renamed into place), and compare.

    python benchmarks/checkpoint_overhead.py --steps 12 --every 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from pocket_teacher import experiment
    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.models import count_parameters, load_teacher, resolve_device
    from pocket_teacher.students import load_student
    from pocket_teacher.train import Vocab, distill

    cfg = experiment.configure(args.preset, [f"train.max_steps={args.steps}", "train.eval_every=0",
                                           "train.checkpoint_every=0", "train.keep_checkpoints=100",
                                           "train.save_final=false"])
    print(f"hardware: {hardware_line()}")
    device = resolve_device(cfg.train.device)
    raw = experiment.load_data(cfg)
    teacher, teacher_tok, info = load_teacher(cfg.teacher, device)
    student_init, tok, _ = load_student(cfg.student, teacher, teacher_tok, device)
    splits = experiment.tokenize(cfg, raw, tok)
    cache = experiment.teacher_cache(cfg, teacher, splits, tok, info)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, every in (("without", 0), ("with", args.every)):
            run_cfg = experiment.apply_overrides(cfg, {"train.checkpoint_every": every})
            result = distill(copy.deepcopy(student_init), None, splits.train, run_cfg, Vocab.of(tok),
                             teacher_cache=cache, folder=Path(tmp) / name, progress=False)
            runs[name] = result
        size = sum(f.stat().st_size for f in next((Path(tmp) / "with" / "checkpoints").iterdir()).iterdir())
    base, ck = runs["without"], runs["with"]
    step_s = base.seconds / args.steps
    per_ckpt = statistics.mean(ck.checkpoint_seconds)
    extra = (ck.seconds - base.seconds) / max(1, len(ck.checkpoint_seconds))
    print(f"training {args.steps} steps: {base.seconds:.1f} s without checkpoints ({step_s:.2f} s/step), "
          f"{ck.seconds:.1f} s with {len(ck.checkpoint_seconds)} checkpoints (one every {args.every} steps)")
    print(f"checkpoint: {per_ckpt:.2f} s each as timed around the save (min {min(ck.checkpoint_seconds):.2f}, "
          f"max {max(ck.checkpoint_seconds):.2f}); {extra:.2f} s each from the difference of the two runs; "
          f"{size / 2**20:.0f} MiB each")
    print(f"share of training time: {per_ckpt / (args.every * step_s) * 100:.1f}% at one checkpoint every "
          f"{args.every} steps; {per_ckpt / step_s:.2f} steps' worth per checkpoint")
    if args.json:
        from pocket_teacher.files import write_json
        write_json(Path(args.json), {
            "hardware": hardware_line(), "settings": vars(args), "parameters": count_parameters(student_init),
            "steps": args.steps, "every": args.every, "seconds_without": base.seconds, "seconds_with": ck.seconds,
            "step_s": step_s, "checkpoint_seconds": ck.checkpoint_seconds, "checkpoint_bytes": size})


if __name__ == "__main__":
    main()
