"""How good is each way of building a student before any training? Held-out perplexity of untrained students.

    python benchmarks/student_init.py                       # pocket preset: the embedded teacher, gsm_symbolic
    python benchmarks/student_init.py --preset tiny         # seconds
    python benchmarks/student_init.py --preset pocket-text --kv-heads 2   # the free-text student (16 layers)

Students, all at the pocket preset's depth (10 of 30 layers unless --layers):
- derive, even: the teacher's layers spread evenly (first and last kept), full width;
- derive, importance: the layers with the largest ShortGPT block influence on --calibration training rows;
- config, random: a narrower model of the same family (--hidden, --heads, --kv-heads, --mlp), fresh weights;
- config, prune: the same shape pruned from the teacher (Minitron-style activation importance), layers by importance.
Perplexity over the answer tokens of the held-out split (data.eval_size rows), as the pipeline measures it (every
token on free-text presets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--layers", type=int, default=None, help="student depth (default: the preset's)")
    parser.add_argument("--hidden", type=int, default=384, help="config students' width")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=64, help="training rows the importance reads")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from pocket_teacher.config import apply_overrides
    from pocket_teacher.evaluate import perplexity
    from pocket_teacher.models import count_parameters
    from pocket_teacher.experiment import Experiment, configure
    from pocket_teacher.runfolder import hardware_line

    base = configure(args.preset, [f"student.calibration_rows={args.calibration}"])
    layers = args.layers or base.student.num_layers
    if args.preset == "tiny":
        args.hidden, args.heads, args.kv_heads, args.mlp = 48, 2, 1, 64
    shape = [f"student.num_layers={layers}", f"student.hidden_size={args.hidden}", f"student.num_heads={args.heads}",
             f"student.num_kv_heads={args.kv_heads}", f"student.intermediate_size={args.mlp}"]
    kinds = {"derive, even": ["student.source=derive", "student.layer_selection=even"],
             "derive, importance": ["student.source=derive", "student.layer_selection=importance"],
             "config, random init": ["student.source=config", "student.init=random", *shape],
             "config, pruned init (importance)": ["student.source=config", "student.init=prune",
                                                  "student.layer_selection=importance", *shape],
             "config, pruned init (even layers)": ["student.source=config", "student.init=prune",
                                                   "student.layer_selection=even", *shape]}
    print(hardware_line())
    exp = Experiment(base, progress=False)
    exp.load_data()
    exp.load_teacher()
    exp.teacher_answers()  # teacher-written presets (pocket-text): the texts the importance is measured on
    exp.load_student()
    teacher_ppl = perplexity(exp.teacher, exp.splits.eval, pad_token_id=exp.tokenizer.pad_token_id,
                             vocab_size=len(exp.tokenizer), progress=False)["perplexity"]
    print(f"\n{args.preset} preset, {len(exp.splits.eval)} held-out rows, {layers} student layers; teacher "
          f"{count_parameters(exp.teacher) / 1e6:.1f}M parameters, perplexity {teacher_ppl:,.2f}\n")
    figures = {"hardware": hardware_line(), "settings": vars(args), "preset": args.preset, "layers": layers,
               "eval_rows": len(exp.splits.eval), "teacher_parameters": count_parameters(exp.teacher),
               "teacher_perplexity": teacher_ppl, "students": []}
    print("| student | parameters | layers kept | untrained held-out perplexity | build s |")
    print("| --- | --- | --- | --- | --- |")
    for name, overrides in kinds.items():
        cfg = apply_overrides(base, overrides)
        start = time.perf_counter()
        trial = Experiment(cfg, progress=False)
        trial.raw, trial.train_raw, trial.teacher_stage = exp.raw, exp.train_raw, exp.teacher_stage
        trial.load_student()
        seconds = time.perf_counter() - start
        student = trial.student_init
        kept = getattr(student.config, "derived_from_layers", None) or getattr(student.config, "pruned_from_layers",
                                                                               "-")
        ppl = perplexity(student, trial.splits.eval, pad_token_id=trial.tokenizer.pad_token_id,
                         vocab_size=len(trial.tokenizer), progress=False)["perplexity"]
        print(f"| {name} | {count_parameters(student) / 1e6:.1f}M | {kept} | {ppl:,.1f} | {seconds:.0f} |", flush=True)
        figures["students"].append({"student": name, "overrides": overrides, "parameters": count_parameters(student),
                                    "layers_kept": list(kept) if kept != "-" else None, "perplexity": ppl,
                                    "build_s": seconds})
    if args.json:
        from pocket_teacher.files import write_json
        write_json(Path(args.json), figures)


if __name__ == "__main__":
    main()
