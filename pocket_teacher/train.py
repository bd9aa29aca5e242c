"""The distillation loop: AdamW with warm-up and cosine decay, clipping, accumulation, on accelerate.

    result = distill(student, teacher, train_split, cfg, pad_token_id=tokenizer.pad_token_id)
    result.history  # one dict per optimizer step: loss, ce, kd, lr, grad_norm, tokens/s ...

The teacher is only read (eval mode, no gradients), so re-running training with other loss
settings never reloads it. Both loss terms are token-weighted over the whole accumulated batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import PaddingCollator, TokenizedSplit
from .losses import DistillationLoss, auto_chunk_size, chunked_distillation_loss, token_distillation_loss
from .models import answer_hidden, answer_logits, answer_positions, output_layer, resolve_device, resolve_precision


@dataclass
class TrainResult:
    """What a distillation run produced besides the trained student."""

    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    seconds: float = 0.0  # wall time of the loop
    steps: int = 0  # optimizer steps taken
    loss_implementation: str = ""  # "chunked" or "full", as resolved from cfg.loss.implementation

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on norms and biases
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_loss_implementation(student: torch.nn.Module, requested: str = "auto") -> str:
    """"chunked" when the student's logits are exactly ``hidden @ W.T (+ b)`` (then the chunked loss
    equals the plain one), else "full"; asking for "chunked" on a model where it is not exact raises."""
    exact = output_layer(student) is not None
    if requested == "chunked" and not exact:
        raise ValueError("loss.implementation='chunked' needs a plain Linear output layer without logit soft-capping "
                         "or scaling; this student has neither, so use loss.implementation=full (or auto).")
    if requested not in ("auto", "chunked", "full"):
        raise ValueError(f"loss.implementation={requested!r}: use auto, chunked or full.")
    return "full" if requested == "full" or not exact else "chunked"


def teacher_inputs(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   select: torch.Tensor, implementation: str) -> dict:
    """The teacher's side of the loss at the answer positions, as keyword arguments of the loss.

    For the chunked loss, the teacher's hidden states and output layer (its logits are then also built
    a chunk at a time) when its output layer is exact; its (N, V) logits otherwise.
    """
    with torch.no_grad():
        layer = output_layer(teacher) if implementation == "chunked" else None
        if layer is not None:
            return {"teacher_hidden": answer_hidden(teacher, input_ids, attention_mask, select),
                    "teacher_weight": layer[0], "teacher_bias": layer[1]}
        return {"teacher_logits": answer_logits(teacher, input_ids, attention_mask, select)}


class DistillStep(torch.nn.Module):
    """The student plus its loss: one forward call returns the `DistillationLoss` of a micro-batch.

    DDP and FSDP wrap this module, so every student parameter, the output layer included, is used
    inside ``forward`` even though the chunked loss reads the output weight directly.
    """

    def __init__(self, model: torch.nn.Module, loss_cfg, implementation: str, vocab_size: Optional[int] = None):
        super().__init__()
        self.model, self.loss_cfg, self.implementation, self.vocab_size = model, loss_cfg, implementation, vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                targets: torch.Tensor, teacher: dict, normalizer: float) -> DistillationLoss:
        lc = self.loss_cfg
        kw = dict(alpha=lc.alpha, temperature=lc.temperature, divergence=lc.divergence, beta=lc.beta, skew=lc.skew,
                  vocab_size=self.vocab_size, normalizer=normalizer)
        if self.implementation == "full":
            logits = answer_logits(self.model, input_ids, attention_mask, select)
            return token_distillation_loss(logits, targets=targets, **teacher, **kw)
        hidden = answer_hidden(self.model, input_ids, attention_mask, select)
        weight, bias = output_layer(self.model)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        return chunked_distillation_loss(hidden, weight, targets, student_bias=bias, chunk_size=lc.chunk_size or None,
                                         compute_dtype=dtype, **teacher, **kw)


def _batches(loader: DataLoader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def distill(student: torch.nn.Module, teacher: Optional[torch.nn.Module], train_split: TokenizedSplit, cfg, *,
            pad_token_id: int, vocab_size: Optional[int] = None, teacher_cache=None,
            on_step: Optional[Callable[[dict], None]] = None, progress: bool = True) -> TrainResult:
    """Train `student` in place to match `teacher` on `train_split` with `cfg.loss` and `cfg.train`.

    Args:
        student: trainable causal LM (fp32 weights; bf16/fp16 autocast on GPU).
        teacher: frozen causal LM sharing the student's tokenizer, already on the device; or None when
            `teacher_cache` is given, or for plain fine-tuning (``loss.alpha=1``, e.g. on the teacher's
            generated answers with a student of another tokenizer).
        train_split: tokenized examples with prompt labels masked.
        teacher_cache: a `teacher_cache.TopKCache` of this split: the teacher's top-k log-probs are read
            from it instead of running the teacher (the top-k loss of `pocket_teacher.losses`).
        cfg: the full Config (uses cfg.train and cfg.loss).
        pad_token_id: id used to pad batches on the right.
        vocab_size: the tokenizer's size (``len(tokenizer)``); logits beyond it (output-layer padding)
            are ignored. Default: both output layers must have the same number of rows.
        on_step: called with each history row (e.g. to stream it to a file).
        progress: show a tqdm bar.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tcfg, lcfg = cfg.train, cfg.loss
    device = resolve_device(tcfg.device)
    compute = resolve_precision("auto", device, "student")
    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(compute, "no"))
    set_seed(tcfg.seed)
    loader = DataLoader(train_split, batch_size=tcfg.batch_size, shuffle=True,
                        collate_fn=PaddingCollator(pad_token_id, "right"),
                        generator=torch.Generator().manual_seed(tcfg.seed))
    optimizer = torch.optim.AdamW(_param_groups(student, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio))
    if teacher is None and teacher_cache is None and lcfg.alpha != 1.0:
        raise ValueError(f"No teacher and no teacher cache, but loss.alpha={lcfg.alpha}: the distillation term needs "
                         f"the teacher. Pass one, or set loss.alpha=1 to fine-tune on the targets alone.")
    if teacher_cache is not None and len(teacher_cache) != len(train_split):
        raise ValueError(f"The teacher cache has {len(teacher_cache)} rows but the split {len(train_split)}: it was "
                         f"built for another split; build it again for this one.")
    implementation = resolve_loss_implementation(student, lcfg.implementation)
    step_module = DistillStep(student.train(), lcfg, implementation, vocab_size)
    model, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    if teacher is not None:
        teacher.eval()
    if progress and accelerator.is_main_process:
        width = vocab_size or student.get_output_embeddings().weight.shape[0]
        chunk = f", {lcfg.chunk_size or auto_chunk_size(width)} tokens per chunk" if implementation == "chunked" else ""
        source = ("top-k teacher cache" if teacher_cache is not None else "live teacher" if teacher is not None
                  else "no teacher (CE only)")
        tqdm.write(f"loss: {lcfg.divergence}, alpha {lcfg.alpha}, T {lcfg.temperature}, {source}; {implementation} "
                   f"implementation{chunk}")

    result = TrainResult()
    batches = _batches(loader)
    bar = tqdm(total=tcfg.max_steps, desc="distill", disable=not progress or not accelerator.is_main_process)
    start = time.perf_counter()
    seen_tokens = 0
    for step in range(tcfg.max_steps):
        micro = [next(batches) for _ in range(tcfg.grad_accum)]
        selects = [answer_positions(b["labels"]) for b in micro]
        answer_tokens = accelerator.reduce(torch.tensor(float(sum(int(s.sum()) for s in selects)),
                                                        device=accelerator.device), "sum")
        # DDP averages gradients over processes, so each one divides by its share of the global count.
        normalizer = float(answer_tokens) / accelerator.num_processes
        parts = torch.zeros(3, device=accelerator.device)
        for i, (batch, select) in enumerate(zip(micro, selects)):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                targets = batch["labels"][:, 1:][select[:, :-1]]
                if teacher_cache is not None:
                    teacher_side = teacher_cache.rows(batch["index"].tolist(), select.sum(1).tolist(),
                                                      accelerator.device)
                elif teacher is not None:
                    teacher_side = teacher_inputs(teacher, batch["input_ids"], batch["attention_mask"], select,
                                                  implementation)
                else:
                    teacher_side = {}
                with accelerator.autocast():
                    loss = model(batch["input_ids"], batch["attention_mask"], select, targets, teacher_side,
                                 normalizer)
                accelerator.backward(loss.total)
                del teacher_side  # free the teacher's tensors before the next micro-batch
            parts += torch.stack([loss.total.detach(), loss.ce.detach(), loss.kd.detach()])
            seen_tokens += int(batch["attention_mask"].sum())
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                     if tcfg.max_grad_norm > 0 else torch.tensor(float("nan")))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        total, ce, kd = (accelerator.reduce(parts, "sum") / accelerator.num_processes).tolist()
        elapsed = time.perf_counter() - start
        row = {"step": step + 1, "loss": total, "ce": ce, "kd": kd if math.isfinite(kd) else None, "lr": lr, "grad_norm": float(grad_norm),
               "answer_tokens": int(answer_tokens), "tokens_per_s": seen_tokens * accelerator.num_processes / elapsed,
               "elapsed_s": elapsed}
        result.history.append(row)
        if on_step is not None and accelerator.is_main_process:
            on_step(row)
        bar.set_postfix_str(f"loss {total:.3f} | ce {ce:.3f} | kd {kd:.3f} | {row['tokens_per_s']:.0f} tok/s",
                            refresh=False)
        bar.update(1)
    bar.close()
    result.seconds, result.steps = time.perf_counter() - start, tcfg.max_steps
    result.loss_implementation = implementation
    accelerator.unwrap_model(model).model.eval()
    return result

