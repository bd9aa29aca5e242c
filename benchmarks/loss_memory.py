"""Peak memory and time of the distillation loss: naive full logits vs the chunked path.

For each vocabulary size, forward + backward of the hybrid loss (alpha 0.5, T 2, forward KL) over
N answer tokens with hidden size H, the teacher given by its hidden states and output layer:

- naive:   student and teacher logits (N, V) in full, log_softmax on both (the plain path,
           `token_distillation_loss`), then backward;
- chunked: `chunked_distillation_loss`, a chunk of tokens at a time, gradients computed per chunk.

Each measurement runs in a fresh process. Peak memory is the loss's own: the process's peak RSS
(CPU) or peak allocated memory (CUDA) minus what the inputs already held, so both paths count their
logits, softmax buffers and the output-layer gradient. Time is the median of `--repeats` runs after
one warm-up run (the warm-up is the one whose peak is reported).

    python benchmarks/loss_memory.py                       # fp32 on the CPU, V = 49,152 and 151,936
    python benchmarks/loss_memory.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(path: str, vocab: int, tokens: int, hidden: int, dtype_name: str, device: str, repeats: int,
           chunk_size: int) -> dict:
    from pocket_teacher.batches import auto_chunk_size
    from pocket_teacher.config import LossConfig
    from pocket_teacher.losses import TeacherHidden, TeacherLogits, chunked_distillation_loss, token_distillation_loss

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    dev = torch.device(device)
    h = (torch.randn(tokens, hidden, device=dev) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=dev) * hidden ** -0.5).to(dtype).requires_grad_()
    th = (torch.randn(tokens, hidden, device=dev) * 0.5).to(dtype)
    tw = (torch.randn(vocab, hidden, device=dev) * hidden ** -0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,), device=dev)
    chunk = chunk_size or auto_chunk_size(vocab)
    spec = LossConfig(alpha=0.5, temperature=2.0, chunk_size=chunk)

    def step() -> float:
        if path == "naive":
            loss = token_distillation_loss(h @ w.T, y, TeacherLogits(th @ tw.T), spec)
        else:
            loss = chunked_distillation_loss(h, w, y, TeacherHidden(th, tw), spec)
        loss.total.backward()
        value = float(loss.total)
        h.grad = w.grad = None
        return value

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()
    value = step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_peak_bytes()) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"path": path, "vocab": vocab, "peak_bytes": peak, "seconds": statistics.median(times), "loss": value,
            "chunk_size": chunk if path == "chunked" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median reported)")
    parser.add_argument("--chunk-size", type=int, default=0, help="tokens per chunk (0 = automatic)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        row = worker(args.worker[0], int(args.worker[1]), args.tokens, args.hidden, args.dtype, args.device,
                     args.repeats, args.chunk_size)
        print("RESULT " + json.dumps(row))
        return

    from pocket_teacher.runfolder import hardware_line

    print(f"hardware: {hardware_line()}")
    print(f"setting: {args.tokens} tokens, hidden {args.hidden}, {args.dtype} on {args.device}, forward KL, alpha 0.5, "
          f"T 2, teacher from hidden states; forward + backward; peak = loss memory above the inputs")
    rows = []
    for vocab in args.vocab:
        pair = {}
        for path in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--worker", path, str(vocab), "--tokens", str(args.tokens),
                   "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
                   "--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"V={vocab} {path}: failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
                continue
            pair[path] = json.loads(lines[-1][7:])
            rows.append(pair[path])
            r = pair[path]
            chunk = f" (chunk {r['chunk_size']} tokens)" if r["chunk_size"] else ""
            print(f"V={vocab:>7,} {path:>7}{chunk}: peak {r['peak_bytes'] / 2**30:6.2f} GiB, "
                  f"{r['seconds']:7.2f} s, loss {r['loss']:.5f}", flush=True)
        if len(pair) == 2:
            n, c = pair["naive"], pair["chunked"]
            print(f"V={vocab:>7,}   ratio: memory chunked/naive {c['peak_bytes'] / n['peak_bytes']:.3f} "
                  f"(1/{n['peak_bytes'] / c['peak_bytes']:.1f}), time chunked/naive {c['seconds'] / n['seconds']:.2f}x",
                  flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"hardware": hardware_line(), "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
