"""Why one 4-bit type can undo a short training: each GGUF type's rounding of a run's student, held against the
training update itself.

    python benchmarks/gguf_grid.py --run runs/pocket --preset pocket --json runs/bench/gguf_grid_pocket.json

A student derived from the embedded teacher starts on that teacher's own 4-bit grid (its GGUF is Q4_1, dequantized).
A short training moves each weight by less than half a step of that grid; quantized again to the same block type,
a block's minimum and maximum barely move, so the weights round back to the levels they started from and the
update is lost, although the error of each tensor is smaller than another type's. For each type this prints, over
the decoder layers' matrices: the share of the training update the quantized weights keep (the projection of
quantized - initial on trained - initial), the share read back exactly as the untrained student's value, the
RMS error against the trained weights; how far training moved the weights and their blocks' ends against the
untrained student's q4_1 blocks; and the held-out perplexity with every tensor quantized, then with one
group at a time (embedding, attention, MLP). Weights are quantized with the torch twin of the GGUF block arithmetic
(`export.quantize_dequantize`, equal to `gguf.quants` bit for bit: tests/test_export.py).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = {"embedding": "embed_tokens", "attention": "self_attn", "MLP": "mlp"}


def matrices(trained, init):
    """(trained, untrained) pairs of the decoder layers' matrices (the embedding left out), as tensors without
    gradients: what the measures below are taken over."""
    start = dict(init.named_parameters())
    for name, weight in trained.named_parameters():
        if weight.ndim == 2 and GROUPS["embedding"] not in name:
            yield weight.detach(), start[name].detach().to(weight.dtype)


def update_kept(trained, init, quant: str) -> dict:
    """Over the decoder layers' matrices: the share of the training update that `quant` keeps, the share of weights
    read back exactly as the untrained value (to float tolerance), and the RMS rounding error."""
    import torch

    from pocket_teacher.export import quantize_dequantize

    kept = norm = same = count = squares = 0.0
    with torch.no_grad():
        for weight, first in matrices(trained, init):
            back = quantize_dequantize(weight, quant)
            delta = weight - first
            kept += float(((back - first) * delta).sum())
            norm += float(delta.pow(2).sum())
            same += int(((back - first).abs() <= 1e-6 * first.abs().clamp_min(1e-3)).sum())
            squares += float((back - weight).pow(2).sum())
            count += weight.numel()
    return {"update_kept": kept / norm if norm else None, "same_as_untrained": same / count,
            "rms_error": (squares / count) ** 0.5}


def grid_motion(trained, init) -> dict:
    """Over the decoder layers' matrices, measured against the untrained student's q4_1 blocks of 32 (for a derived
    student, the teacher's own grid): the share of weights whose training update is under half a step of their
    block, and how far the blocks' minimum and maximum moved, in steps (the mean over blocks)."""
    import torch

    below = count = moved = blocks = 0.0
    with torch.no_grad():
        for weight, first in matrices(trained, init):
            if weight.shape[-1] % 32:  # kept in f16 by every 4-bit type: no blocks
                continue
            first, now = first.reshape(-1, 32), weight.reshape(-1, 32)
            step = ((first.amax(-1) - first.amin(-1)) / 15).clamp_min(1e-12)
            below += int(((now - first).abs() < step[:, None] / 2).sum())
            count += now.numel()
            shift = ((now.amin(-1) - first.amin(-1)).abs() + (now.amax(-1) - first.amax(-1)).abs()) / 2
            moved += float((shift / step).sum())
            blocks += len(step)
    return {"update_under_half_step": below / count, "block_ends_moved_steps": moved / blocks}


def quantized(model, quant: str, part: str | None):
    """A copy of `model` with the matrices of `part` (a GROUPS value; None: all) as a `quant` file holds them."""
    import torch

    from pocket_teacher.export import quantize_dequantize

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in twin.named_parameters():
            if part is None or part in name:
                weight.copy_(quantize_dequantize(weight, quant))
    return twin


def main() -> None:
    from gguf_export import heldout, run_arguments

    args = run_arguments(__doc__, ["q8_0", "q4_0", "q4_1"], "a finished run folder whose student was derived or pruned")

    import torch
    from transformers import AutoModelForCausalLM

    from pocket_teacher.evaluate import perplexity
    from pocket_teacher.files import write_json
    from pocket_teacher.runfolder import hardware_line

    run = Path(args.run)
    exp = heldout(run, args.preset, args.set)  # builds the untrained student as the run built it
    split, tok, init = exp.splits.eval, exp.tokenizer, exp.student_stage.init
    trained = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()

    def ppl(model) -> float:
        return perplexity(model, split, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                          progress=False)["perplexity"]

    rows = {"fp32": {"perplexity": ppl(trained), **grid_motion(trained, init)}}
    print(f"fp32: held-out perplexity {rows['fp32']['perplexity']:.2f}; against the untrained student's q4_1 blocks, "
          f"{rows['fp32']['update_under_half_step']:.1%} of the updates are under half a step and the blocks' ends "
          f"moved {rows['fp32']['block_ends_moved_steps']:.2f} steps on average", flush=True)
    for quant in args.quant:
        row = {**update_kept(trained, init, quant), "perplexity": ppl(quantized(trained, quant, None)),
               "perplexity_one_group": {g: ppl(quantized(trained, quant, part)) for g, part in GROUPS.items()}}
        rows[quant] = row
        print(f"{quant}: keeps {row['update_kept']:.2f} of the training update, "
              f"{row['same_as_untrained']:.1%} read back as the untrained value, RMS error {row['rms_error']:.2e}; "
              f"perplexity {row['perplexity']:.2f} (one group: "
              + ", ".join(f"{g} {v:.2f}" for g, v in row["perplexity_one_group"].items()) + ")", flush=True)
    if args.json:
        write_json(Path(args.json), {"hardware": hardware_line(), "settings": vars(args), "run": str(run),
                                     "eval_rows": len(split), "rows": rows})


if __name__ == "__main__":
    main()
