"""Training speed with the live teacher vs from its top-k cache, cache size, and top-k fidelity.

On the `pocket` preset (embedded SmolLM2-135M-Instruct teacher, 10-layer derived student, fp32 on
CPU), in one run: build (or reuse) the top-k cache of the training split, then train the same number
of steps from the same initial student twice, once with the live teacher and once from the cache,
and compare optimizer steps per second (the first step of each is a warm-up and not counted).
Then the top-k mass on real GSM8K answers (../shared/data/gsm8k/train.jsonl or --gsm8k).

    python benchmarks/teacher_cache.py --steps 12 --gsm8k-rows 200
    python benchmarks/teacher_cache.py --set teacher_cache.k=32
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def steps_per_second(history: list[dict]) -> float:
    if len(history) < 2:
        return float("nan")
    return (len(history) - 1) / (history[-1]["elapsed_s"] - history[0]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=12, help="training steps per mode (first one is warm-up)")
    parser.add_argument("--gsm8k", default=str(SHARED) if SHARED.is_file() else None,
                        help="GSM8K JSONL for the top-k mass on real answers (skipped when absent)")
    parser.add_argument("--gsm8k-rows", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from pocket_teacher import experiment
    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.data import load_gsm8k, tokenize_examples
    from pocket_teacher.models import load_teacher, resolve_device
    from pocket_teacher.students import load_student
    from pocket_teacher.teacher_cache import Fidelity, build_topk_cache
    from pocket_teacher.train import Vocab, distill

    cfg = experiment.configure(args.preset, [*args.set, f"train.max_steps={args.steps}"])
    print(f"hardware: {hardware_line()}")
    device = resolve_device(cfg.train.device)
    raw = experiment.load_data(cfg)
    teacher, teacher_tok, teacher_info = load_teacher(cfg.teacher, device)
    print(teacher_info)
    student_init, tok, _ = load_student(cfg.student, teacher, teacher_tok, device)
    splits = experiment.tokenize(cfg, raw, tok)
    k = cfg.teacher_cache.k
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cache = build_topk_cache(teacher, splits.train, root, k=k, vocab_size=len(tok),
                                 batch_size=cfg.teacher_cache.batch_size, progress=False,
                                 fidelity=Fidelity(temperature=cfg.loss.temperature))
        build_s = time.perf_counter() - start
        print(cache.report)
        print(f"cache build: {build_s:.1f} s for {cache.report.rows} rows ({cache.report.tokens / build_s:.0f} "
              f"answer tokens/s)")
        speed = {}
        for mode in ("live", "cache"):
            student = copy.deepcopy(student_init)
            result = distill(student, teacher if mode == "live" else None, splits.train, cfg,
                             Vocab.of(tok), teacher_cache=cache if mode == "cache" else None, progress=False)
            speed[mode] = steps_per_second(result.history)
            last = result.history[-1]
            print(f"train from {mode:>5}: {speed[mode]:.3f} steps/s ({1 / speed[mode]:.2f} s/step, batch "
                  f"{cfg.train.batch_size}), last loss {last['loss']:.3f} (ce {last['ce']:.3f}, kd {last['kd']:.3f})")
        figures = {"hardware": hardware_line(), "settings": vars(args), "preset": args.preset, "k": k,
                   "batch_size": cfg.train.batch_size, "build_s": build_s, "rows": cache.report.rows,
                   "tokens": cache.report.tokens, "cache_bytes": cache.report.bytes,
                   "mass_mean": cache.report.mass_mean, "mass_p05": cache.report.mass_p05,
                   "kl_sample": cache.report.kl_sample, "steps_per_s": speed}
        print(f"speed-up from the cache: {speed['cache'] / speed['live']:.2f}x steps/s "
              f"(pays back its {build_s:.0f} s build after "
              f"{build_s / max(1e-9, 1 / speed['live'] - 1 / speed['cache']):.0f} steps)")

    if args.gsm8k:
        examples, report = load_gsm8k("train", path=args.gsm8k, limit=args.gsm8k_rows)
        split = tokenize_examples(examples, tok, max_length=cfg.data.max_length * 2)
        with tempfile.TemporaryDirectory() as root:
            real = build_topk_cache(teacher, split, root, k=k, vocab_size=len(tok),
                                    batch_size=cfg.teacher_cache.batch_size, progress=False,
                                    fidelity=Fidelity(rows=len(split), temperature=cfg.loss.temperature))
        print(f"GSM8K train answers ({real.report.rows} rows, {real.report.tokens:,} tokens, {args.gsm8k}): "
              f"top-{k} mass mean {real.report.mass_mean:.4f}, 5th percentile {real.report.mass_p05:.4f}, "
              f"KL(full || top-{k}) {real.report.kl_sample:.4f} nats/token")
        figures["gsm8k"] = {"rows": real.report.rows, "tokens": real.report.tokens, "mass_mean": real.report.mass_mean,
                            "mass_p05": real.report.mass_p05, "kl_sample": real.report.kl_sample}
    else:
        print("GSM8K: no file (pass --gsm8k PATH); top-k mass on real answers not measured")
    if args.json:
        from pocket_teacher.files import write_json
        write_json(Path(args.json), figures)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
