"""The memory plan beside the measurement: is `pocket_teacher.plan` within 15% of the real peaks?

Each stage (teacher cache, evaluation, generation, training, export, healing) runs in a fresh process on a preset, after the data
and models are loaded; its peak is the process's peak resident set size during the stage on CPU (VmHWM, reset at
the stage's start) and the caching allocator's peak plus the CUDA context on a GPU. The plan is computed for the
same rows (their real lengths): the longest training rows, so every batch is as long as the plan's worst case, and
generation runs to its full budget (no early EOS), the plan's worst case too.

On CPU the plan counts live bytes. glibc's default allocator keeps freed blocks below its (dynamic, up to 32 MiB)
mmap threshold in the process heap, so the default peak RSS also holds freed-but-kept memory that the process
reuses; the comparison is therefore made with the threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_=1048576: freed
tensors go back to the OS, RSS is the live set), and the default glibc peak is printed beside it. The fixed
threshold is not used for training itself: it makes the pocket preset's steps about 20% slower here.

    python benchmarks/memory_plan.py                       # tiny and pocket, all stages, on this machine
    python benchmarks/memory_plan.py --preset pocket --stage training
    python benchmarks/memory_plan.py --heldout 16 64 256   # evaluation's peak vs the number of held-out rows (the
                                                           # same 16 rows repeated: more tokens, same longest batch)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

STAGES = ("teacher cache", "evaluation", "generation", "training", "export", "healing")


def _rss(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def _peak(device) -> int:
    import torch

    from pocket_teacher.plan import CUDA_CONTEXT

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() + CUDA_CONTEXT
    return _rss("VmHWM")


def _subset(split, rows):
    from pocket_teacher.data import TokenizedSplit

    keep = sorted(range(len(split)), key=lambda i: -len(split.features[i]["input_ids"]))[:rows]
    return TokenizedSplit([split.features[i] for i in keep], [split.examples[i] for i in keep], split.report,
                          split.max_length, split.template)


def one_stage(preset: str, stage: str, overrides: list[str], heldout: int | None) -> dict:
    """Run `stage` of `preset` in this process; return the plan's and the measured peak in bytes."""
    import torch

    from pocket_teacher import experiment
    from pocket_teacher.data import TokenizedSplit, format_prompt
    from pocket_teacher.export import EQUALIZE_ROWS, attach_fake_quant, equalization, export_gguf, teacher_gguf
    from pocket_teacher.evaluate import GREEDY, agreement, perplexity
    from pocket_teacher.models import load_teacher, offload, resolve_device
    from pocket_teacher.students import load_student
    from pocket_teacher.plan import memory_plan
    from pocket_teacher.teacher_cache import build_topk_cache
    from pocket_teacher.train import Vocab, distill

    base = experiment.configure(preset)
    rows = 4 * base.train.batch_size
    sets = [f"data.train_size={max(rows * 3, 48)}", "train.eval_every=0", "train.checkpoint_every=0",
            "train.max_steps=3", "train.warmup_steps=1"]
    cfg = experiment.configure(preset, sets + overrides)
    device = resolve_device(cfg.train.device)
    raw = experiment.load_data(cfg, verbose=False)
    teacher, teacher_tok, _ = load_teacher(cfg.teacher, device)
    student_init, tok, _ = load_student(cfg.student, teacher, teacher_tok, device)
    offload(student_init, "cpu")
    splits = experiment.tokenize(cfg, raw, tok, verbose=False)
    train = _subset(splits.train, rows)
    lengths = [len(f["input_ids"]) for f in train.features]
    eval_split = splits.eval
    if heldout:  # the same 16 rows repeated: more held-out tokens, the same longest batch
        base_rows = _subset(splits.eval, 16)
        reps = -(-heldout // len(base_rows))
        eval_split = TokenizedSplit((base_rows.features * reps)[:heldout], (base_rows.examples * reps)[:heldout],
                                    base_rows.report, base_rows.max_length, base_rows.template)
    if stage == "generation":
        eval_split = _subset(splits.eval, cfg.eval.batch_size)
    eval_lengths = [len(f["input_ids"]) for f in eval_split.features]
    prompt_lengths = [sum(1 for t in f["labels"] if t == -100) for f in eval_split.features]
    plan = memory_plan(cfg, "cpu" if device.type == "cpu" else None, lengths=lengths, eval_lengths=eval_lengths,
                       prompt_lengths=prompt_lengths, suggest=False)
    planned = next(s for s in plan.stages if s.name == stage)
    with tempfile.TemporaryDirectory() as root:
        cache = None
        # export and healing: what the plan has wait on the host (the distilled student, the baseline)
        waiting = [copy.deepcopy(student_init) for k in planned.host if k.endswith("student (on host)")]
        if stage in ("training", "healing"):
            cache = build_topk_cache(teacher, train, root, k=cfg.teacher_cache.k, vocab_size=len(tok), progress=False)
            if device.type == "cuda":
                offload(teacher, "cpu")
        _reset_peak(device)
        if stage == "teacher cache":
            build_topk_cache(teacher, train, root, k=cfg.teacher_cache.k, vocab_size=len(tok),
                             batch_size=cfg.teacher_cache.batch_size, progress=False)
        elif stage == "evaluation":
            with experiment.visiting(student_init, device):
                perplexity(teacher, eval_split, pad_token_id=tok.pad_token_id, batch_size=cfg.eval.batch_size,
                           vocab_size=len(tok), progress=False)
                agreement(teacher, student_init, eval_split, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                          batch_size=cfg.eval.batch_size, progress=False)
        elif stage == "generation":
            prompts = [format_prompt(tok, e.question, cfg.data.system_prompt) for e in eval_split.examples]
            tok.padding_side = "left"
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            new = cfg.eval.max_new_tokens
            with torch.no_grad():
                teacher.generate(**enc, **GREEDY, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
        elif stage == "training":
            distill(copy.deepcopy(student_init), None, train, cfg, Vocab.of(tok), teacher_cache=cache, progress=False)
        elif stage == "export":  # as Experiment.export: the distilled student (waiting[0]) calibrated, then written
            calibration = [list(train[i]["input_ids"]) for i in range(min(EQUALIZE_ROWS, len(train)))]
            with experiment.visiting(waiting[0], device):
                scales = equalization(waiting[0], calibration)
            export_gguf(waiting[0], tok, Path(root) / "student-q8_0.gguf", "q8_0", equalized=scales,
                        tokenizer_gguf=teacher_gguf(cfg.teacher.source, tok, waiting[0].config.vocab_size))
        elif stage == "healing":  # as Experiment.heal: one copy, made on the host, every matrix equalized and rounded
            scales = equalization(student_init, [list(train[i]["input_ids"]) for i in range(min(EQUALIZE_ROWS,
                                                                                                  len(train)))])
            healing = attach_fake_quant(copy.deepcopy(student_init), "q4_0", scales)
            distill(healing, None, train, cfg, Vocab.of(tok), teacher_cache=cache, progress=False)
        measured = _peak(device)
        del waiting
    measure = "allocator peak + CUDA context" if device.type == "cuda" else "peak RSS"
    planned_bytes = planned.device_peak if device.type == "cuda" else planned.host_peak
    return {"preset": preset, "stage": stage, "planned": planned_bytes, "measured": measured, "measure": measure,
            "items": planned.device if device.type == "cuda" else planned.host, "heldout": len(eval_split),
            "eval_tokens": sum(eval_lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", default=None, help="preset(s) to measure (default tiny, pocket)")
    parser.add_argument("--stage", action="append", default=None, choices=STAGES)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--heldout", type=int, nargs="*", default=None,
                        help="evaluation only, at these numbers of held-out rows (peak must not grow with them)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per stage and allocator setting; the median is reported")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        held = args.heldout[0] if args.heldout else None
        print("RESULT " + json.dumps(one_stage(args.preset[0], args.stage[0], args.set, held)))
        return

    from pocket_teacher.runfolder import hardware_line

    print(f"hardware: {hardware_line()}")
    presets = args.preset or ["tiny", "pocket"]
    jobs = ([(p, "evaluation", n) for p in presets for n in args.heldout] if args.heldout
            else [(p, s, None) for p in presets for s in (args.stage or STAGES)])
    worst, rows = 0.0, []
    for preset, stage, held in jobs:
        cmd = [sys.executable, __file__, "--child", "--preset", preset, "--stage", stage,
               *[x for s in args.set for x in ("--set", s)], *(["--heldout", str(held)] if held else [])]
        medians = {}
        for malloc, extra in (("live", {"MALLOC_MMAP_THRESHOLD_": "1048576"}), ("default", {})):
            if malloc == "default" and not sys.platform.startswith("linux"):
                continue
            runs = []
            for _ in range(args.repeats):
                env = dict(os.environ, TQDM_DISABLE="1", **extra)
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{preset:7s} {stage:14s} failed:\n{proc.stderr[-2000:]}")
                    break
                runs.append(json.loads(line[7:]))
            if runs:
                measured = sorted(r["measured"] for r in runs)
                medians[malloc] = (measured[len(measured) // 2], runs[0])
        if "live" not in medians:
            continue
        median, r = medians["live"]
        error = r["planned"] / median - 1
        worst = max(worst, abs(error))
        held_text = f" held-out {r['heldout']:4d} rows / {r['eval_tokens']:6,d} tokens" if held else ""
        default = (f"; default glibc {medians['default'][0] / 2**20:7,.0f} MiB" if "default" in medians
                   and r["measure"] == "peak RSS" else "")
        rows.append({"preset": preset, "stage": stage, "heldout": r.get("heldout") if held else None,
                     "eval_tokens": r.get("eval_tokens") if held else None, "planned_bytes": r["planned"],
                     "measured_bytes": median, "measure": r["measure"],
                     "default_glibc_bytes": medians["default"][0] if "default" in medians else None})
        if os.environ.get("PLAN_DEBUG"):
            print("  plan items", {k: v >> 20 for k, v in r["items"].items()})
        print(f"{preset:7s} {stage:14s}{held_text} plan {r['planned'] / 2**20:7,.0f} MiB  measured "
              f"{median / 2**20:7,.0f} MiB ({r['measure']}){default}  plan/measured - 1 = {100 * error:+5.1f}%",
              flush=True)
    print(f"largest difference: {100 * worst:.1f}% (target: within 15%)")
    if args.json:
        from pocket_teacher.files import write_json
        write_json(Path(args.json), {"hardware": hardware_line(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
