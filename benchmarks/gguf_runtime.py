"""The exported files in a runtime no one here wrote: llama.cpp, through llama-cpp-python.

For each GGUF file of a finished run's student (exported afresh to <run>/gguf-bench/, activations equalized as the
export command writes them unless --no-equalize), on the run's held-out split:

- teacher-forced: llama.cpp's next-token logits against transformers' on the same file (the same dequantized
  weights): top-1 agreement and mean KL(transformers || llama.cpp) over every position, and each one's perplexity
  on the answer tokens; llama.cpp's own tokenizer against the student's on the same texts;
- the same two measures between transformers and itself with llama.cpp's rounding of the activations before each
  quantized matmul (`export.llama_cpp_arithmetic`: 8-bit blocks against q8_0 / q4_0 / q4_1 weights): what that
  rounding alone costs, with no llama.cpp code involved;
- greedy decoding of held-out prompts in both (how many tokens agree before the first difference);
- the same comparison on the teacher's own GGUF file when the teacher is one (the embedded SmolLM2 Q4_1, written
  by llama.cpp's own converter and quantizer): what a file no one here wrote reaches on the same rows;
- speed and memory, each model in a fresh process: load time, prompt time, decode tokens/s at batch 1 and the
  process's peak resident memory, for every file in llama.cpp, the fp32 student in PyTorch, and the teacher in both
  (its own embedded GGUF in llama.cpp, dequantized to fp32 in PyTorch), with the same number of threads.

    pip install llama-cpp-python==0.3.36      # no wheel on PyPI: builds llama.cpp (CMake, C++; ~10 min on 2 cores)
    python benchmarks/gguf_runtime.py --run runs/pocket --preset pocket --json runs/bench/gguf_runtime.json

Without llama-cpp-python the script says so with the install line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _child(args) -> None:
    """One model in this process: load it, then per prompt a prefill and `new_tokens` greedy steps; prints JSON.
    The llama.cpp child imports neither torch nor this package, so its peak memory is llama.cpp's own."""
    prompts = json.loads(Path(args.prompts_file).read_text())
    start = time.perf_counter()
    if args.child == "llama":
        import importlib.util  # pocket_teacher/llamacpp.py alone: the package's __init__ would import torch

        spec = importlib.util.spec_from_file_location("llamacpp", ROOT / "pocket_teacher" / "llamacpp.py")
        llamacpp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(llamacpp)
        n_ctx = max(map(len, prompts)) + args.new_tokens + 8
        llm = llamacpp.load(args.model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads,
                            n_threads_batch=args.threads, verbose=False)
    else:
        import torch

        torch.set_num_threads(args.threads)
        from pocket_teacher.export import load_gguf

        if args.model.endswith(".gguf"):
            model, _ = load_gguf(args.model)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    prefill, decode = [], []
    for ids in prompts:
        if args.child == "llama":
            llm.reset()
            t0 = time.perf_counter()
            for n, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=False)):
                if n == 0:
                    t1 = time.perf_counter()
                if n + 1 == args.new_tokens:
                    break
        else:
            import torch

            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model(torch.tensor([ids]), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                for _ in range(args.new_tokens - 1):
                    out = model(token, past_key_values=out.past_key_values, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append((args.new_tokens - 1) / (t2 - t1))
    decode.sort()
    # the peak resident memory of this process image (VmHWM starts again at exec; getrusage's maxrss would keep
    # the parent's size from before the fork)
    peak_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))
    print(json.dumps({"load_s": load_s, "prefill_s": sum(prefill) / len(prefill),
                      "decode_tokens_per_s": decode[len(decode) // 2], "prompt_tokens": sum(map(len, prompts)),
                      "peak_rss_mib": peak_kib / 1024}))


def _measure(kind: str, model: str, prompts_file: Path, new_tokens: int, threads: int) -> dict:
    """`_child` in a fresh process: its figures, its peak resident memory among them."""
    command = [sys.executable, __file__, "--child", kind, "--model", model, "--prompts-file", str(prompts_file),
               "--new-tokens", str(new_tokens), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(path: Path, split, tok, rows: int, prompts: list, new_tokens: int, threads: int) -> dict:
    """llama.cpp against transformers on one file: teacher-forced logits, perplexity, tokenizer, greedy decoding."""
    import numpy as np
    import torch

    from pocket_teacher.export import (compare_next_token, llama_cpp_arithmetic, llama_cpp_logits, llama_cpp_model,
                                       load_gguf)

    model, _ = load_gguf(path)
    width = max(len(split[i]["input_ids"]) for i in range(rows)) + 8
    llm = llama_cpp_model(path, n_ctx=max(width, max(map(len, prompts)) + new_tokens + 8), threads=threads)
    agree, kl, positions, nll = 0.0, 0.0, 0, {"llama.cpp": 0.0, "transformers": 0.0}
    answer_tokens, same_tokenization, rounding = 0, 0, {"top1": 0.0, "kl": 0.0}
    for i in range(rows):
        row = split[i]
        ids, labels = [int(t) for t in row["input_ids"]], [int(x) for x in row["labels"]]
        theirs = llama_cpp_logits(llm, ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].float().numpy()
            with llama_cpp_arithmetic(model, path):  # llama.cpp's rounding of activations, in transformers
                rounded = model(torch.tensor([ids])).logits[0].float().numpy()
        c = compare_next_token(ours, theirs)
        agree, kl, positions = agree + c["top1"] * len(ids), kl + c["kl"] * len(ids), positions + len(ids)
        alone = compare_next_token(ours, rounded)
        rounding = {key: rounding[key] + alone[key] * len(ids) for key in rounding}
        target = np.array(labels[1:])
        keep = target != -100
        for name, logits in (("transformers", ours), ("llama.cpp", theirs)):
            lp = torch.log_softmax(torch.from_numpy(logits[:-1][keep]).double(), -1)
            nll[name] -= lp[torch.arange(int(keep.sum())), torch.from_numpy(target[keep])].sum().item()
        answer_tokens += int(keep.sum())
        text = tok.decode(ids, skip_special_tokens=False)
        same_tokenization += llm.tokenize(text.encode(), add_bos=False, special=True) == tok(
            text, add_special_tokens=False)["input_ids"]
    greedy_same = []
    for ids in prompts:
        theirs, ours = _greedy_llama(llm, ids, new_tokens), _greedy_torch(model, ids, new_tokens)
        greedy_same.append(next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b), new_tokens))
    return {"rows": rows, "positions": positions, "top1_agreement": agree / positions, "mean_kl": kl / positions,
            "rounding_alone_top1": rounding["top1"] / positions, "rounding_alone_kl": rounding["kl"] / positions,
            "perplexity_llama_cpp": float(np.exp(nll["llama.cpp"] / answer_tokens)),
            "perplexity_transformers": float(np.exp(nll["transformers"] / answer_tokens)),
            "answer_tokens": answer_tokens, "same_tokenization": f"{same_tokenization}/{rows}",
            "greedy_tokens_identical": greedy_same, "greedy_prompts_identical": sum(
                g == new_tokens for g in greedy_same)}


def _greedy_llama(llm, ids: list, new_tokens: int) -> list:
    from pocket_teacher.export import llama_cpp_logits

    out = list(ids)
    for _ in range(new_tokens):
        out.append(int(llama_cpp_logits(llm, out)[-1].argmax()))
    return out[len(ids):]


def _greedy_torch(model, ids: list, new_tokens: int) -> list:
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def _prompt(row: dict) -> list:
    """A held-out row's prompt (the tokens before its answer); free text, trained on every token, is continued
    from its first 16 tokens."""
    prompt = [int(t) for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
    return prompt or [int(t) for t in row["input_ids"][:16]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run folder")
    parser.add_argument("--preset", help="the preset the run used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's overrides")
    parser.add_argument("--quant", nargs="+", default=["f32", "q8_0", "q4_0", "q4_1"])
    parser.add_argument("--files", nargs="*", default=[], help="more GGUF files of the same student (e.g. healed)")
    parser.add_argument("--rows", type=int, default=24, help="held-out rows scored teacher-forced")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded greedily")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-speed", action="store_true", help="only the agreement (no speed or memory children: "
                                                                 "for a machine whose cores are shared)")
    parser.add_argument("--no-equalize", action="store_true",
                        help="export the student's files with the weights as trained (default: activations "
                             "equalized, as `python -m pocket_teacher export` writes them)")
    parser.add_argument("--embedding-type", default=None, metavar="TYPE",
                        help="the embedding and output layer's own type in the student's files (export "
                             "--embedding-type; one of export.QUANTS)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=["llama", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if not (args.run and args.preset):
        parser.error("--run and --preset are required")
    from pocket_teacher.export import LLAMA_CPP_INSTALL, QUANTS, export_run, llama_cpp_version

    if args.embedding_type not in (None, *QUANTS):  # checked here, not by argparse: the children import no torch
        parser.error(f"--embedding-type {args.embedding_type}: use one of {', '.join(QUANTS)}")

    version = llama_cpp_version()
    if version is None:
        print(f"llama-cpp-python is not installed, nothing measured. Install it with: {LLAMA_CPP_INSTALL}")
        return
    from gguf_export import bench_file, heldout

    from pocket_teacher.files import write_json
    from pocket_teacher.models import embedded_gguf_path
    from pocket_teacher.runfolder import hardware_line

    run = Path(args.run)
    exp = heldout(run, args.preset, args.set)
    split, tok = exp.splits.eval, exp.tokenizer
    from pocket_teacher.llamacpp import extra_buffers_default

    extra = extra_buffers_default()
    print(f"hardware: {hardware_line()}; llama-cpp-python {version}, {args.threads} threads, llama.cpp's extra "
          f"buffer types {'on' if extra else 'off (this CPU has AMX: pocket_teacher/llamacpp.py)'}", flush=True)
    files = []
    for quant in args.quant:
        path = bench_file(run, quant, args.embedding_type)  # written afresh: never an earlier run's file
        print(export_run(run, "student", quant, path, calibration=None if args.no_equalize else
                         exp.calibration_rows(), embedding=args.embedding_type), flush=True)
        files.append(path)
    files += [Path(f) for f in args.files]
    prompts = [_prompt(split[i]) for i in range(min(args.prompts, len(split)))]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        prompts_file = Path(scratch) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for path in files:
            row = {"bytes": path.stat().st_size,
                   **_compare(path, split, tok, min(args.rows, len(split)), prompts, args.new_tokens, args.threads)}
            if not args.no_speed:
                row["llama_cpp"] = _measure("llama", str(path), prompts_file, args.new_tokens, args.threads)
            rows[path.name] = row
            print(f"{path.name}: {json.dumps(row)}", flush=True)
        reference = {"student fp32 (PyTorch)": ("torch", str(run / "student"))}
        source = exp.cfg.teacher.source
        teacher = embedded_gguf_path() if source == "embedded" else Path(source) if source.endswith(".gguf") else None
        if teacher is not None:  # the teacher's own file in both runtimes (a Hub or tiny teacher has none)
            reference.update({"teacher GGUF (llama.cpp)": ("llama", str(teacher)),
                              "teacher fp32 (PyTorch)": ("torch", str(teacher))})
        for name, (kind, model) in ({} if args.no_speed else reference).items():
            rows[name] = {"runtime": _measure(kind, model, prompts_file, args.new_tokens, args.threads)}
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
        if teacher is not None:  # a file written by llama.cpp's own tools, scored on the same rows: the yardstick
            rows.setdefault("teacher GGUF (llama.cpp)", {}).update(
                file=teacher.name, bytes=teacher.stat().st_size,
                **_compare(teacher, split, tok, min(args.rows, len(split)), prompts, args.new_tokens, args.threads))
            print(f"teacher GGUF (llama.cpp): {json.dumps(rows['teacher GGUF (llama.cpp)'])}", flush=True)
    if args.json:
        write_json(Path(args.json), {"hardware": hardware_line(), "llama_cpp_python": version, "extra_buffers": extra,
                                     "settings": {k: v for k, v in vars(args).items() if k not in (
                                         "child", "model", "prompts_file")},
                                     "run": str(run), "rows": rows})


if __name__ == "__main__":
    main()
