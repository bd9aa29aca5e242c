"""A short check for a lent GPU: a few distillation steps with an 8-bit teacher and a bf16 and an fp16 student.

No Hub on a lent machine, so the models are random-init with the real shapes of Qwen2.5-1.5B-Instruct (teacher,
loaded in 8-bit through bitsandbytes) and Qwen2.5-0.5B-Instruct (student: fp32 weights, bf16 or fp16 autocast),
with Qwen's padded vocabulary (151,936 rows, 151,665 tokens). For each precision it runs `--steps` optimizer steps of
`pocket_teacher.train.distill` with the live teacher (the heaviest training stage) and prints the allocator's peak
beside the memory plan's figure for that stage, tokens/s and MFU.

    python benchmarks/gpu_smoke.py                         # on a CUDA GPU (about two minutes on an A100/H100)
    python benchmarks/gpu_smoke.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-1.5B-Instruct
    python benchmarks/gpu_smoke.py --cpu-dry-run           # the same code path on CPU with tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def random_model(shape, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab_rows, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied, use_cache=False)
    with torch.device("cpu"):
        return Qwen2ForCausalLM(config).to(dtype)


def synthetic_split(vocab: int, rows: int, length: int, seed: int = 0):
    from pocket_teacher.data import LoadReport, TokenizedSplit

    gen = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(rows):
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        prompt = length // 3
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return TokenizedSplit(features, [], LoadReport("synthetic", rows, rows), length, "synthetic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="Qwen/Qwen2.5-1.5B-Instruct")
    parser.add_argument("--student", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per precision (first is a warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing=true")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes, fp32, on CPU: checks the code path")
    args = parser.parse_args()

    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.models import freeze
    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.plan import CUDA_CONTEXT, get_device, memory_plan, model_shape
    from pocket_teacher.train import Vocab, distill

    print(f"hardware: {hardware_line()}")
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        raise SystemExit("gpu_smoke.py needs a CUDA GPU (8-bit teacher, bf16/fp16 autocast); --cpu-dry-run checks "
                         "the code path on CPU instead.")
    t_shape, s_shape = model_shape(args.teacher), model_shape(args.student)
    if args.cpu_dry_run:
        t_shape = dataclasses.replace(t_shape, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2,
                                      head_dim=16, vocab_rows=1024, tokenizer_size=1000, name="tiny teacher")
        s_shape = dataclasses.replace(t_shape, layers=2, name="tiny student")
        args.length = min(args.length, 64)
    vocab = s_shape.vocab
    split = synthetic_split(vocab, args.batch * (args.steps + 1), args.length)
    device = get_device(None)

    with tempfile.TemporaryDirectory() as folder:
        teacher_cpu = random_model(t_shape, torch.float16 if cuda else torch.float32)
        teacher_cpu.save_pretrained(folder)
        del teacher_cpu
        if cuda:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            teacher = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
                load_in_8bit=True), device_map={"": 0}, dtype=torch.float16)
            teacher_precision = "8bit"
        else:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            teacher_precision = "fp32"
    freeze(teacher)
    teacher_bytes = torch.cuda.memory_allocated() if cuda else 0
    print(f"teacher {t_shape.name}: {teacher_precision}, {teacher_bytes / 2**30:.2f} GiB on the GPU")
    precisions = (["bf16"] if cuda and torch.cuda.get_device_capability() >= (8, 0) else []) + (["fp16"] if cuda
                                                                                                else ["no"])
    for mixed in precisions:
        student = random_model(s_shape)
        overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.grad_accum=1",
                     "train.warmup_steps=1", f"train.mixed_precision={mixed}", "teacher_cache.use=false",
                     f"train.gradient_checkpointing={str(args.checkpointing).lower()}", "train.optimizer=adamw",
                     f"train.device={'cuda' if cuda else 'cpu'}", "train.eval_every=0", "train.checkpoint_every=0",
                     f"teacher.precision={teacher_precision}", f"teacher.source={args.teacher}",
                     f"student.source={args.student}"]
        cfg = apply_overrides(get_preset("t4"), overrides)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        result = distill(student, teacher, split, cfg, Vocab(0, vocab), progress=False)
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated() + CUDA_CONTEXT if cuda else None
        h = result.history
        step_s = (h[-1]["elapsed_s"] - h[0]["elapsed_s"]) / max(1, len(h) - 1)
        tokens = args.batch * args.length
        flops = tokens * (s_shape.params * (8 if args.checkpointing else 6) + 2 * t_shape.params)
        mfu = flops / step_s / (device.tflops * 1e12)
        plan = memory_plan(cfg, None, lengths=[args.length] * len(split), suggest=False,
                           device=device) if cuda and not args.cpu_dry_run else None
        line = (f"{mixed:>4}: {len(h)} steps in {seconds:.1f} s, {step_s:.3f} s/step, {tokens / step_s:,.0f} tokens/s, "
                f"MFU {100 * mfu:.1f}% of {device.tflops:.0f} TFLOP/s, final loss {h[-1]['loss']:.3f}")
        if plan is not None:
            planned = next(s for s in plan.stages if s.name == "training").device_peak
            line += (f"; peak {peak / 2**30:.2f} GiB (allocator + {CUDA_CONTEXT / 2**30:.1f} GiB context), plan "
                     f"{planned / 2**30:.2f} GiB ({100 * (planned / peak - 1):+.1f}%)")
        print(line, flush=True)
        del student, result


if __name__ == "__main__":
    main()
