"""The distillation loop: AdamW with warm-up and cosine decay, clipping, accumulation, on accelerate.

    result = distill(student, teacher, train_split, cfg, Vocab.of(tokenizer), folder="runs/NAME")
    result.history  # one dict per optimizer step: loss, ce, kd, lr, grad_norm, tokens/s ...

The teacher is only read (eval mode, no gradients), so re-running training with other loss settings never reloads it.
Both loss terms are token-weighted over the whole accumulated batch and over all processes, so one process with a global
batch of 8 and two with 4 each give the same steps. The data order is a pure function of (seed, step), which makes
checkpoints resumable exactly: a resumed run repeats the uninterrupted run's loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from . import checkpoints as ckpt
from .batches import AnswerBatch, GlobalBatches, answer_batch, answer_hidden, answer_logits, on_policy_step
from .data import TokenizedSplit
from .evaluate import HeldOutTeacher, perplexity
from .files import model_digest, write_failure
from .generate import sample_rollouts
from .losses import (DistillationLoss, Divergence, TeacherHidden, TeacherLogits, TeacherSignal, TeacherTopK,
                     auto_chunk_size, chunked_distillation_loss, divergence_name, sampled_token_loss,
                     token_distillation_loss, topk_buckets)
from .models import device_capability, native_bf16, output_layer, resolve_device, resolve_mixed_precision
from .progress import tqdm
from .teacher_cache import splitdigest


@dataclass
class TrainResult:
    """What a distillation run produced besides the trained student."""

    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    seconds: float = 0.0  # wall time of the loop
    steps: int = 0  # optimizer steps taken
    loss_implementation: str = ""  # "chunked" or "full", as resolved from cfg.loss.implementation
    resumed_from: Optional[str] = None  # the checkpoint this run continued from
    checkpoint_seconds: list = field(default_factory=list)  # wall time of each checkpoint written
    mixed_precision: str = "no"  # bf16, fp16 (with dynamic loss scaling) or no, as resolved for the device
    run_id: str = ""  # identifies this training run in its checkpoints
    collapsed: Optional[str] = None  # why the student looks dead (zero gradients, uniform perplexity), else None
    student: Optional[torch.nn.Module] = None  # the trained student, whole (under FSDP: gathered on process 0)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine down to `min_lr_ratio`.

    The loop sets each step's lr from this pure function of the step and the current config, so there is no scheduler
    state to checkpoint, and a resume with an allowed change of train.lr or the schedule needs no surgery. Why not
    transformers' `get_cosine_with_min_lr_schedule_with_warmup`: it gives step 0 a learning rate of 0 (a first step that
    changes nothing) and so starts its cosine one step later; switching would move every published figure. torch's
    LinearLR + CosineAnnealingLR chain computes the cosine recursively (its last digits drift from the closed form)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, tcfg, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW with fp32 states (train.optimizer=adamw) or bitsandbytes' 8-bit AdamW (adamw_8bit: about 2 instead
    of 8 bytes of state per parameter; block-wise quantized states, as in Dettmers et al. 2022). `device`: where
    the training runs (the parameters may still be on the host when the optimizer is made)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms and biases
    if tcfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("train.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (or use "
                              "train.optimizer=adamw).") from exc
        return bnb.optim.AdamW8bit(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))
    # On the CPU, the fused kernel: one pass over each parameter's weights, gradient and states instead of the default
    # loop of a dozen elementwise ops (measured: 0.07 s against 0.36 s a step for the pocket student's 64M parameters,
    # 2-core AMD EPYC); on a GPU the default (foreach) stays, as under FSDP
    cpu = torch.device(device).type == "cpu" and all(p.dtype == torch.float32 for p in params)
    fused = {"fused": True} if params and cpu else {}
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), **fused)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations (non-reentrant
    torch.utils.checkpoint, which works with DDP/FSDP and frozen inputs); the KV cache is off meanwhile."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing=true: {type(model).__name__} does not support it in "
                         f"transformers; set it to false (and lower train.batch_size if memory is short).")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def resolve_loss_implementation(student: torch.nn.Module, requested: str = "auto") -> str:
    """"chunked" when the student's logits are exactly ``hidden @ W.T (+ b)`` (then the chunked loss
    equals the plain one), else "full"; asking for "chunked" on a model where it is not exact raises."""
    exact = output_layer(student) is not None
    if requested == "chunked" and not exact:
        raise ValueError("loss.implementation='chunked' needs a plain Linear output layer without logit soft-capping "
                         "or scaling; this student has neither, so use loss.implementation=full (or auto).")
    return "full" if requested == "full" or not exact else "chunked"


def live_teacher(teacher: torch.nn.Module, batch: AnswerBatch, implementation: str) -> TeacherSignal:
    """The live teacher's signal at the batch's answer positions: for the chunked loss its hidden states and output
    layer (its logits are then also built a chunk at a time) when its output layer is exact; else its (N, V) logits."""
    with torch.no_grad():
        layer = output_layer(teacher) if implementation == "chunked" else None
        if layer is not None:
            return TeacherHidden(answer_hidden(teacher, batch.input_ids, batch.attention_mask, batch.select), *layer)
        return TeacherLogits(answer_logits(teacher, batch.input_ids, batch.attention_mask, batch.select))


class DistillStep(torch.nn.Module):
    """The student plus its loss: one forward call returns the `DistillationLoss` of a micro-batch.

    DDP and FSDP wrap this module, so every student parameter, the output layer included, is used inside
    ``forward`` even though the chunked loss reads the output weight directly. `divergence`: as in `distill`."""

    def __init__(self, model: torch.nn.Module, loss_cfg, implementation: str, vocab_size: Optional[int] = None,
                 divergence: Optional[Divergence] = None):
        super().__init__()
        self.model, self.loss_cfg, self.implementation, self.vocab_size = model, loss_cfg, implementation, vocab_size
        self.divergence = divergence

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                targets: torch.Tensor, teacher: Optional[TeacherSignal], normalizer: float,
                on_policy: bool = False) -> DistillationLoss:
        """On an on-policy step (`on_policy`) `targets` are the student's samples: the loss is the divergence term
        alone (T^2 * D; no CE, which has no reference there), or the sampled-token estimator."""
        spec = self.loss_cfg
        if on_policy and spec.on_policy_estimator == "sampled":
            logits = answer_logits(self.model, input_ids, attention_mask, select)
            return sampled_token_loss(logits, targets, teacher, spec, vocab_size=self.vocab_size,
                                      normalizer=normalizer)
        if on_policy:
            spec = dataclasses.replace(spec, alpha=0.0)
        if self.implementation == "full":
            logits = answer_logits(self.model, input_ids, attention_mask, select)
            return token_distillation_loss(logits, targets, teacher, spec, vocab_size=self.vocab_size,
                                           normalizer=normalizer, divergence=self.divergence)
        hidden = answer_hidden(self.model, input_ids, attention_mask, select)
        weight, bias = output_layer(self.model)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        return chunked_distillation_loss(hidden, weight, targets, teacher, spec, student_bias=bias,
                                         vocab_size=self.vocab_size, normalizer=normalizer, compute_dtype=dtype,
                                         divergence=self.divergence)


@dataclass
class OpenedStep:
    """One training step opened up on a visible batch (the notebook's "one step" cell), exactly as the training
    step receives it."""

    batch: AnswerBatch  # the rows, padded; their answer positions and targets
    student_logits: torch.Tensor  # (N, V) the student's logits there (no gradient)
    teacher: Optional[TeacherSignal]  # the teacher at the same N positions (cache top-k or live), None without one
    tokenizer: object

    def mask_table(self):
        """One line per row of the batch: its tokens, how many are prompt (label -100, never scored), answer (each
        a target of the loss) and padding, as a DataFrame."""
        import pandas as pd

        labels, mask = self.batch.labels, self.batch.attention_mask.bool()
        answer = (labels != -100).sum(1)
        return pd.DataFrame({"row": self.batch.rows, "tokens": mask.sum(1).tolist(),
                             "prompt (masked)": (mask.sum(1) - answer).tolist(), "answer (targets)": answer.tolist(),
                             "padding": (~mask).sum(1).tolist()})

    def mask_text(self, row: int = 0) -> str:
        """Row `row`'s text cut where the mask changes: the prompt the loss never scores, then the answer tokens."""
        ids, labels = self.batch.input_ids[row], self.batch.labels[row]
        keep = self.batch.attention_mask[row].bool()
        prompt, answer = ids[keep & (labels == -100)], ids[keep & (labels != -100)]
        return (f"PROMPT, {len(prompt)} tokens, label -100 (never scored):\n{self.tokenizer.decode(prompt)}\n"
                f"ANSWER, {len(answer)} tokens, each a target:\n{self.tokenizer.decode(answer)}")

    def distributions(self, position: int = 0, k: int = 8, temperature: float = 1.0):
        """At answer position `position` (0 = the first answer token of the batch), the teacher's k likeliest
        tokens beside the student's probability of each, at `temperature`, as a DataFrame."""
        import pandas as pd

        student = torch.softmax(self.student_logits[position].float() / temperature, -1)
        if isinstance(self.teacher, TeacherTopK):  # the cache's top-k at T = 1, tempered over its K + 1 buckets
            log_p, _ = topk_buckets(self.student_logits[position:position + 1].float(),
                                    self.teacher.chunk(position, position + 1, student.shape[-1]), temperature)
            ids, probs = self.teacher.ids[position][:k].long(), log_p[0, :k].exp()
        elif self.teacher is not None:
            teacher = self.teacher.chunk(position, position + 1, student.shape[-1]).logits[0].float()
            probs, ids = torch.softmax(teacher / temperature, -1).topk(k)
        else:
            probs, ids = torch.full((k,), float("nan")), student.topk(k).indices
        return pd.DataFrame({"token": [self.tokenizer.decode([int(i)]) for i in ids], "teacher": probs.tolist(),
                             "student": student[ids].tolist(),
                             "target": ["<-" if int(i) == int(self.batch.targets[position]) else "" for i in ids]})


@torch.no_grad()
def open_step(student: torch.nn.Module, train_split: TokenizedSplit, cfg, tokenizer, *,
              teacher: Optional[torch.nn.Module] = None, teacher_cache=None, rows: int = 4) -> OpenedStep:
    """The first `rows` rows of the training's first global batch (the order `GlobalBatches` draws), padded as
    the loop pads them, with the student's logits and the teacher's signal at the answer positions: the cache's
    top-k when `teacher_cache` is given (as training reads it), else the live teacher's logits."""
    device = next(student.parameters()).device
    picked = GlobalBatches(len(train_split), min(rows, len(train_split)), cfg.train.seed)[0]
    batch = answer_batch(train_split, picked, tokenizer.pad_token_id, device)
    signal = (teacher_cache.rows(picked, batch.answer_counts, device) if teacher_cache is not None
              else None if teacher is None else live_teacher(teacher, batch, "full"))
    return OpenedStep(batch, answer_logits(student, batch.input_ids, batch.attention_mask, batch.select), signal,
                      tokenizer)


# How the notebook resumes (the CLI's --resume is --set train.resume=true): the one way, named by every message
NOTEBOOK_RESUME = ("notebook: run the cells again with TRAIN_OVERRIDES = ['train.resume=true'] in the training cell "
                   "(exp.distil)")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the message names the step, the likely cause, the
    checkpoint of the last good weights and the command that continues from them."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived: a checkpoint was saved at the step boundary (when a folder was given)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM and SIGINT (Colab, schedulers, Ctrl-C) only raise a flag that the loop reads at the
    next step boundary; a second SIGINT interrupts at once. Installed in the main thread only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# What resume compares: the settings training itself reads (the student, the loss, the loop; a train.* knob marked
# bookkeeping only says where or how it runs or what it records), and the content of what it reads instead of the
# settings that produced it: the training rows' tokens (the data file, the data and generate settings, the
# teacher's answers or texts all end there) and the teacher signal (the cache's fingerprint, or the live teacher's
# weights). Nothing upstream of training can change what it computes without changing one of these two.
CONTENTS = {"data.contents": "the training rows' tokens and masks: the data file, a data.* or generate.* setting, or "
                             "the teacher's answers changed",
            "teacher.signal": "the teacher's signal: its weights or precision, or the top-k cache it was read from "
                              "(teacher_cache.k, the split) changed"}


def content_fingerprint(split: TokenizedSplit, teacher: Optional[torch.nn.Module] = None, teacher_cache=None) -> dict:
    """The CONTENTS entries of a training run: digests of the rows' tokens and of the teacher signal."""
    if teacher_cache is not None:
        signal_ = f"cache {teacher_cache.meta['fingerprint']}"
    else:
        signal_ = f"live {model_digest(teacher)}" if teacher is not None else "none"
    return {"data.contents": splitdigest(split)["tokens"], "teacher.signal": signal_}


def training_fingerprint(cfg, divergence: Optional[Divergence] = None, contents: Optional[dict] = None) -> dict:
    """Every setting that shapes training (the student, the loss, the loop's non-bookkeeping knobs), flattened, with
    the `contents` of `content_fingerprint`; a divergence function given in place of loss.divergence is named too."""
    free = {f"train.{f.name}" for f in dataclasses.fields(cfg.train) if f.metadata.get("bookkeeping")}
    tree = cfg.to_dict()
    flat = _flat({k: tree[k] for k in ("student", "loss", "train")})
    custom = {"loss.divergence_function": divergence_name(divergence)} if divergence is not None else {}
    return {k: v for k, v in flat.items() if k not in free} | custom | (contents or {})


def fingerprint_differences(saved: dict, current: dict) -> dict[str, tuple]:
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def collapse_advice(tcfg=None) -> str:
    """What to change after a collapse: a warm-up as long as the run never reached train.lr, so the rate is not
    the cause then; otherwise a lower rate than the one used."""
    if tcfg is None:
        return "lower train.lr"
    if tcfg.warmup_steps >= tcfg.max_steps:
        until = "until the last step" if tcfg.warmup_steps == tcfg.max_steps else "throughout"
        return (f"the warm-up ({tcfg.warmup_steps} steps) takes the whole run ({tcfg.max_steps} steps), so the "
                f"learning rate stayed below train.lr {until}: shorten train.warmup_steps or raise train.max_steps")
    return f"lower train.lr (now {tcfg.lr:g})"


def uniform_collapse(ppl: Optional[float], vocab_size: Optional[int], before: Optional[float] = None,
                     tcfg=None) -> Optional[str]:
    """A held-out perplexity within a factor 2 of guessing uniformly over the vocabulary that training did not
    improve (`before`: the same measure before training, when known; a random tiny model starts there)."""
    if ppl is None or not vocab_size or ppl < 0.5 * vocab_size or (before is not None and ppl < before):
        return None
    than = "" if before is None else f" and no better than before training ({before:,.0f})"
    return (f"the held-out perplexity {ppl:,.0f} is no better than guessing uniformly over {vocab_size:,} "
            f"tokens{than} ({collapse_advice(tcfg)})")


def collapse_reason(history: list[dict], vocab_size: Optional[int], last: int = 5, tcfg=None) -> Optional[str]:
    """Why the student looks dead after training, or None: zero gradients over the last steps, or a held-out
    perplexity no better than guessing uniformly over the vocabulary that training did not improve (compared with
    the first held-out score, when there are several)."""
    tail = history[-last:]
    norms = [r.get("grad_norm") for r in tail]
    if len(tail) == last and all(n is not None and math.isfinite(n) and n < 1e-12 for n in norms):
        return (f"the gradient norm was 0 over the last {last} steps: the student stopped learning (a learning rate "
                f"far too high saturates it; {collapse_advice(tcfg)})")
    scores = [r["eval_ppl"] for r in history if r.get("eval_ppl") is not None]
    return uniform_collapse(scores[-1] if scores else None, vocab_size, scores[0] if len(scores) > 1 else None, tcfg)


@dataclass(frozen=True)
class Vocab:
    """What training needs of the tokenizer: the padding id, its real size (output-layer rows beyond it, padding,
    never take probability mass; None: compare the output layers' full widths) and where rollouts stop (None: the
    student's generation config's)."""

    pad_token_id: int
    size: Optional[int] = None
    eos_token_id: Optional[int] = None

    @classmethod
    def of(cls, tokenizer) -> "Vocab":
        return cls(tokenizer.pad_token_id, len(tokenizer), getattr(tokenizer, "eos_token_id", None))


@dataclass
class HeldOut:
    """The held-out split scored every train.eval_every steps (perplexity and KD term into the history as
    eval_ppl / eval_kd), with its teacher cache when there is one (else the live teacher scores it)."""

    split: TokenizedSplit
    cache: Optional[object] = None


def distill(student: torch.nn.Module, teacher: Optional[torch.nn.Module], train_split: TokenizedSplit, cfg,
            vocab: Vocab | int, *, teacher_cache=None, held_out: Optional[HeldOut] = None,
            folder: Optional[str | Path] = None, progress: bool = True,
            divergence: Optional[Divergence] = None) -> TrainResult:
    """Train `student` in place to match `teacher` on `train_split` with `cfg.loss` and `cfg.train`: `Trainer(...)
    .fit()`.

    Args:
        student: trainable causal LM (fp32 weights; bf16/fp16 autocast on GPU).
        teacher: frozen causal LM sharing the student's tokenizer, already on the device; or None when
            `teacher_cache` is given, or for plain fine-tuning (``loss.alpha=1``, e.g. on the teacher's
            generated answers with a student of another tokenizer).
        train_split: tokenized examples with prompt labels masked.
        cfg: the full Config (uses cfg.train and cfg.loss).
        vocab: the tokenizer's padding id, size and end-of-sequence id (`Vocab.of(tokenizer)`), or the padding id
            alone (then both output layers must have the same number of rows).
        teacher_cache: a `teacher_cache.TopKCache` of this split: the teacher's top-k log-probs are read
            from it instead of running the teacher (the top-k loss of `pocket_teacher.losses`).
        held_out: a held-out split (and its teacher cache) scored every ``train.eval_every`` steps.
        folder: the run folder: checkpoints go to folder/checkpoints (``train.checkpoint_every``; also on a
            non-finite loss or a stop signal), and the history streams to folder/history.jsonl (main process).
            With ``train.resume`` the run continues from the newest valid checkpoint there.
        progress: show a tqdm bar.
        divergence: D as a function of teacher and student log-probs ``(N, K) -> (N,)``, instead of the one
            loss.divergence names (e.g. defined in a notebook cell); the history's kd is its value.

    Raises:
        TrainingDiverged: the loss or the gradient norm became NaN or infinite; the optimizer step was not
            taken and the weights of the last good step are saved first (when `folder` is given).
        TrainingInterrupted: SIGTERM or SIGINT arrived; a checkpoint was saved at the step boundary.
        CheckpointError: resume found no checkpoint, or one written with other settings (see
            ``train.resume_allow``), or a checkpoint could not be written (disk full).
    """
    return Trainer(student, teacher, train_split, cfg, vocab, teacher_cache=teacher_cache, held_out=held_out,
                   folder=folder, progress=progress, divergence=divergence).fit()


class Trainer:
    """One training run cut at its seams: setup (here), start or resume, micro-batches, forward and backward, the
    optimizer step behind its guard, the history row, checkpoints. `fit()` runs it; `distill` is the one-call
    form. Arguments as in `distill`."""

    def __init__(self, student, teacher, train_split, cfg, vocab: Vocab | int, *, teacher_cache=None,
                 held_out: Optional[HeldOut] = None, folder=None, progress: bool = True,
                 divergence: Optional[Divergence] = None):
        self.student, self.teacher, self.split, self.cfg = student, teacher, train_split, cfg
        self.tcfg, self.lcfg = cfg.train, cfg.loss
        self.vocab = vocab if isinstance(vocab, Vocab) else Vocab(int(vocab))
        self.vocab_size, self.cache, self.held_out = self.vocab.size, teacher_cache, held_out
        scored = held_out is not None and (held_out.cache is not None or teacher is not None)
        self.held_out_teacher = HeldOutTeacher(self.lcfg, divergence, held_out.cache, teacher) if scored else None
        self.progress, self.divergence = progress, divergence
        self.run_folder = Path(folder) if folder is not None else None
        self.folder = self.run_folder / "checkpoints" if folder is not None else None
        t, device = self.tcfg, resolve_device(self.tcfg.device)  # mixed precision as the device allows, TF32 on sm80+
        self.compute = resolve_mixed_precision(t.mixed_precision, device.type, device_capability(device))
        if device.type == "cuda" and native_bf16(device_capability(device)):
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the loss's weight gradient) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        if t.log_with and folder is None:
            raise ValueError("train.log_with needs a run folder for the tracker's files (pass folder=).")
        trackers = {"log_with": t.log_with, "project_dir": str(self.run_folder)} if t.log_with else {}
        self.accelerator = Accelerator(cpu=device.type == "cpu", **trackers,
                                       mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(self.compute, "no"))
        set_seed(t.seed)
        if t.on_policy > 0 and teacher is None:
            raise ValueError(f"train.on_policy={t.on_policy}: the student's sampled answers are scored by the live "
                             f"teacher (no cache can hold them); pass the teacher (the experiment keeps it on the "
                             f"device).")
        if teacher is None and teacher_cache is None and cfg.loss.alpha != 1.0:
            raise ValueError(f"No teacher and no teacher cache, but loss.alpha={cfg.loss.alpha}: the distillation "
                             f"term needs the teacher. Pass one, or set loss.alpha=1 to fine-tune on the targets "
                             f"alone.")
        if teacher_cache is not None and len(teacher_cache) != len(train_split):
            raise ValueError(f"The teacher cache has {len(teacher_cache)} rows but the split {len(train_split)}: it "
                             f"was built for another split; build it again for this one.")
        self.eos_token_id = self.vocab.eos_token_id if self.vocab.eos_token_id is not None else getattr(
            getattr(student, "generation_config", None), "eos_token_id", None)
        self.rollout_stats: Optional[dict] = None
        self.procs, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.batches = GlobalBatches(len(train_split), self.tcfg.batch_size * self.procs, self.tcfg.seed)
        if self.tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        self.optimizer = make_optimizer(student, self.tcfg, self.accelerator.device)
        self.implementation = resolve_loss_implementation(student, self.lcfg.implementation)
        student.to(self.accelerator.device)
        self.result = TrainResult(loss_implementation=self.implementation, mixed_precision=self.compute)
        self.say = tqdm.write if self.accelerator.is_main_process else (lambda *_: None)
        self.start_step, self.previous_seconds, self.resumed_diverged = 0, 0.0, False
        self.began, self.history_file = time.perf_counter(), None
        # what the checkpoints' fingerprint holds besides settings (a digest of the live teacher's weights: once)
        self.contents = content_fingerprint(train_split, teacher, teacher_cache) if self.folder is not None else None

    def start(self) -> None:
        """Resume this run's newest checkpoint (train.resume), or start (moving an earlier run's checkpoints aside)."""
        result, main = self.result, self.accelerator.is_main_process
        result.run_id = uuid.uuid4().hex[:12]
        if self.tcfg.resume:
            state = _resume(self.folder, self.cfg, self.student, self.optimizer, self.say, self.divergence,
                            self.contents)
            self.start_step, self.previous_seconds = state["step"], state.get("seconds", 0.0)
            result.history, result.resumed_from, result.run_id = state["history"], state["path"], state["run_id"]
            self.resumed_diverged = bool(state.get("diverged_after"))
        elif self.folder is not None and main:
            moved = ckpt.move_aside(self.folder)  # an earlier run's checkpoints are never resumed or pruned here
            if moved is not None:
                self.say(f"checkpoints: {self.folder} held an earlier run's checkpoints; moved them to {moved}")
        for row in result.history:  # history.jsonl starts again from the rows restored on resume
            self.stream(row)
        step_module = DistillStep(self.student.train(), self.lcfg, self.implementation, self.vocab_size,
                                  self.divergence)
        self.model, self.optimizer = self.accelerator.prepare(step_module, self.optimizer)
        if self.teacher is not None:
            self.teacher.eval()
        if self.tcfg.log_with:
            self.accelerator.init_trackers(self.cfg.run.name, config=_flat(self.cfg.to_dict())
                                           if hasattr(self.cfg, "to_dict") else {})
        if self.progress and main:  # the run's settings in one line
            t, lc, procs = self.tcfg, self.lcfg, self.procs
            width = self.vocab_size or self.student.get_output_embeddings().weight.shape[0]
            chunk = (f", {lc.chunk_size or auto_chunk_size(width, self.accelerator.device.type)} tokens per chunk"
                     if self.implementation == "chunked" else "")
            source = ("top-k teacher cache" if self.cache is not None else "live teacher" if self.teacher is not None
                      else "no teacher (CE only)")
            name = lc.divergence if self.divergence is None else f"custom divergence {divergence_name(self.divergence)}"
            self.say(f"loss: {name}, alpha {lc.alpha}, T {lc.temperature}, {source}; {self.implementation} "
                     f"implementation{chunk}; {procs} process(es), global batch {t.batch_size * procs} x "
                     f"{t.grad_accum} accumulation; mixed precision {self.compute}, {t.optimizer}, gradient "
                     f"checkpointing {'on' if t.gradient_checkpointing else 'off'}")
        if main and self.tcfg.warmup_steps > self.tcfg.max_steps:
            print(f"WARNING: train.warmup_steps={self.tcfg.warmup_steps} is longer than train.max_steps="
                  f"{self.tcfg.max_steps}: the learning rate ends at {self.tcfg.max_steps / self.tcfg.warmup_steps:.0%}"
                  f" of train.lr; use train.warmup_steps <= {self.tcfg.max_steps}.")

    def stream(self, row: dict) -> None:
        """Append a history row to <folder>/history.jsonl (main process; the file is rewritten from a run's first
        row, so a resumed run's file holds the restored rows and then its own)."""
        if self.run_folder is None or not self.accelerator.is_main_process:
            return
        line, path = json.dumps(row) + "\n", self.run_folder / "history.jsonl"
        try:
            if self.history_file is None:
                self.run_folder.mkdir(parents=True, exist_ok=True)
                self.history_file = path.open("w")
            self.history_file.write(line)
            self.history_file.flush()
        except OSError as exc:
            kept = ckpt.list_checkpoints(self.folder) if self.folder is not None else []
            after = (f"The checkpoints in {self.folder} are intact and hold the history up to each one; free space "
                     f"there and continue with --resume ({NOTEBOOK_RESUME})." if kept else
                     "No checkpoint was written yet (train.checkpoint_every sets how often), so nothing can be "
                     "resumed: free space there and run again.")
            raise write_failure(path, len(line) * max(1, self.tcfg.max_steps - row["step"]), exc, after) from exc

    def save(self, step: int, diverged: bool = False) -> Optional[Path]:
        """A checkpoint of the weights after `step` steps (process 0 writes; all wait), pruned to keep_checkpoints."""
        if self.folder is None:
            return None
        began, path, acc = time.perf_counter(), None, self.accelerator
        if acc.is_main_process:
            state = {"history": self.result.history,
                     "seconds": self.previous_seconds + time.perf_counter() - self.began,
                     "batches_consumed": step * self.tcfg.grad_accum, "run_id": self.result.run_id,
                     "fingerprint": training_fingerprint(self.cfg, self.divergence, self.contents),
                     "diverged_after": diverged}
            path = ckpt.save_checkpoint(self.folder, step, acc.unwrap_model(self.model).model, self.optimizer, state)
            ckpt.prune(self.folder, self.tcfg.keep_checkpoints)
        acc.wait_for_everyone()
        self.result.checkpoint_seconds.append(time.perf_counter() - began)
        return path

    def micro_batches(self, step: int) -> list[AnswerBatch]:
        """This process's share of global batch `step`, cut into train.grad_accum micro-batches on the device."""
        t, micro = self.tcfg, []
        for i in range(t.grad_accum):
            rows = self.batches[step * t.grad_accum + i][self.rank * t.batch_size:(self.rank + 1) * t.batch_size]
            micro.append(answer_batch(self.split, rows, self.vocab.pad_token_id, self.accelerator.device))
        return micro

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on rollouts (`batches.on_policy_step`)."""
        return on_policy_step(step, self.tcfg.on_policy)

    def rollouts(self, micro: list[AnswerBatch], step: int) -> list[AnswerBatch]:
        """Each micro-batch's prompts answered by the student's own samples (seeded by run seed, step,
        micro-batch and process, so resuming samples the same), with the sampling statistics kept for the row."""
        t, student = self.tcfg, self.accelerator.unwrap_model(self.model).model
        out, lengths, finished = [], [], 0
        for i, batch in enumerate(micro):
            seed = ((t.seed * 1_000_003 + step) * 64 + i) * 1024 + self.rank
            r = sample_rollouts(student, batch, pad_token_id=self.vocab.pad_token_id, eos_token_id=self.eos_token_id,
                                seed=seed, temperature=t.rollout_temperature, top_p=t.rollout_top_p,
                                max_new_tokens=t.rollout_max_new_tokens, vocab_size=self.vocab.size)
            out.append(r.batch)
            lengths += r.lengths
            finished += r.finished
        self.rollout_stats = {"rollouts": len(lengths), "rollout_tokens_mean": sum(lengths) / max(1, len(lengths)),
                              "rollouts_finished": finished}
        return out

    def teacher_side(self, batch: AnswerBatch, on_policy: bool = False) -> Optional[TeacherSignal]:
        """The teacher's signal for this micro-batch: the cache's top-k, the live teacher's, or None (no teacher).
        Sampled answers (on-policy steps) are scored by the live teacher: no cache can hold them."""
        if self.cache is not None and not on_policy:
            return self.cache.rows(batch.rows, batch.answer_counts, self.accelerator.device)
        if self.teacher is None:
            return None
        full = on_policy and self.lcfg.on_policy_estimator == "sampled"  # the estimator reads the logits
        return live_teacher(self.teacher, batch, "full" if full else self.implementation)

    def forward_backward(self, micro: list[AnswerBatch], on_policy: bool = False) -> tuple[torch.Tensor, int, int]:
        """Loss and gradients of one optimizer step, token-weighted over every micro-batch and process.
        Returns the summed (total, ce, kd), the global answer-token count and the tokens this process saw.
        On an on-policy step the micro-batches hold the student's rollouts and ce is 0 (not measured)."""
        acc = self.accelerator
        answer_tokens = int(acc.reduce(torch.tensor(float(sum(b.targets.numel() for b in micro)), device=acc.device),
                                       "sum"))
        normalizer = answer_tokens / self.procs  # DDP averages gradients: each process takes its share
        parts, seen = torch.zeros(3, device=acc.device), 0
        for i, batch in enumerate(micro):
            with contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model):
                side = self.teacher_side(batch, on_policy)
                with acc.autocast():
                    loss = self.model(batch.input_ids, batch.attention_mask, batch.select, batch.targets, side,
                                      normalizer, on_policy)
                acc.backward(loss.total)
                del side  # free the teacher's tensors before the next micro-batch
            kd = torch.zeros_like(loss.total) if loss.kd is None else loss.kd.detach()
            ce = torch.zeros_like(kd) if loss.ce is None or on_policy else loss.ce.detach()
            parts += torch.stack([loss.total.detach(), ce, kd])
            seen += int(batch.attention_mask.sum())
        return acc.reduce(parts, "sum") / self.procs, answer_tokens, seen

    def record(self, step: int, total: float, ce: float, kd: float, lr: float, grad_norm: float,
               answer_tokens: int, seen_tokens: int) -> dict:
        """The history row of a finished step (held-out scores every train.eval_every), streamed and logged."""
        t, acc = self.tcfg, self.accelerator
        elapsed = time.perf_counter() - self.began
        no_kd = self.teacher is None and self.cache is None
        on_policy = self.rollout_stats is not None
        row = {"step": step + 1, "loss": total, "ce": None if on_policy else ce, "kd": None if no_kd else kd,
               "lr": lr, "grad_norm": grad_norm, "answer_tokens": answer_tokens,
               "tokens_per_s": seen_tokens * self.procs / elapsed, "elapsed_s": self.previous_seconds + elapsed}
        if t.on_policy > 0:
            row.update({"policy": "on" if on_policy else "off", **(self.rollout_stats or {})})
        if (self.held_out is not None and t.eval_every and acc.is_main_process
                and ((step + 1) % t.eval_every == 0 or step + 1 == t.max_steps)):
            model = acc.unwrap_model(self.model).model
            was_training = model.training
            out = perplexity(model, self.held_out.split, pad_token_id=self.vocab.pad_token_id, batch_size=8,
                             vocab_size=self.vocab_size, progress=False, teacher=self.held_out_teacher)
            model.train(was_training)
            row.update(eval_ppl=out["perplexity"], eval_ce=out["nll"], eval_kd=out.get("kd"))
        self.result.history.append(row)
        self.stream(row)
        if t.log_with:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step + 1)
        return row

    def fit(self) -> TrainResult:
        """Start or resume (`start`), then train to train.max_steps: one optimizer step per global batch, the
        guard before each, a history row after, checkpoints every train.checkpoint_every and at a stop signal."""
        t, acc = self.tcfg, self.accelerator
        self.start()
        bar = tqdm(total=t.max_steps, initial=self.start_step, desc="distill",
                   disable=not self.progress or not acc.is_main_process)
        self.began, seen_tokens = time.perf_counter(), 0
        self.scale_at_start = self.largest_weight()
        with StopSignals() as stop, contextlib.closing(bar), contextlib.closing(self):
            for step in range(self.start_step, t.max_steps):
                micro, on_policy = self.micro_batches(step), self.on_policy(step)
                self.rollout_stats = None
                if on_policy:
                    micro = self.rollouts(micro, step)
                parts, answer_tokens, seen = self.forward_backward(micro, on_policy)
                seen_tokens += seen
                total, ce, kd = parts.tolist()
                # The guard looks before the optimizer step, so the weights stay those of the last good step.
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm or math.inf))
                if not math.isfinite(total) or (self.compute != "fp16" and not math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    again = step == self.start_step and self.resumed_diverged  # no step worked since the last one
                    damaged = self.damage()
                    path = None if again or damaged else self.save(step, diverged=True)
                    raise TrainingDiverged(_divergence_message(step, total, ce, kd, grad_norm, t, self.compute, path,
                                                               again, damaged))
                lr = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                row = self.record(step, total, ce, kd, lr, grad_norm, answer_tokens, seen_tokens)
                terms = [f"{k} {'-' if row[k] is None else format(row[k], '.3f')}" for k in ("loss", "ce", "kd")]
                bar.set_postfix_str(" | ".join(terms + [f"{row['tokens_per_s']:.0f} tok/s"]) + (
                    f" | eval ppl {row['eval_ppl']:.2f}" if "eval_ppl" in row else ""), refresh=False)
                bar.update(1)
                path = self.save(step + 1) if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 else None
                if self.procs > 1:  # a stop signal that reached any process stops them all
                    flag = acc.reduce(torch.tensor(float(stop.signum), device=acc.device), "max")
                    stop.signum = stop.signum or int(flag)
                if stop.signum:  # SIGTERM / SIGINT: keep this step, then stop cleanly
                    path = path or self.save(step + 1)
                    where = (f"checkpoint saved in {path}; continue with --resume ({NOTEBOOK_RESUME})" if path
                             else "no checkpoint folder was given, so nothing was saved")
                    raise TrainingInterrupted(stop.signum, f"{signal.Signals(stop.signum).name} after step {step + 1} "
                                                           f"of {t.max_steps}; {where}.")
        periodic = t.checkpoint_every and t.max_steps % t.checkpoint_every == 0
        if t.save_final and self.start_step < t.max_steps and not periodic:
            self.save(t.max_steps)  # the finished state: a run stopped in a later stage resumes past this training
        return self.finish()

    def largest_weight(self) -> float:
        """The largest |weight| of the student, over every process (each holds only its shard under FSDP)."""
        local = max((float(p.detach().abs().max()) for p in self.student.parameters()
                     if p.is_floating_point() and p.numel()), default=0.0)
        if self.procs == 1:
            return local
        return float(self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), "max"))

    def damage(self) -> Optional[str]:
        """Why the current weights are not worth a resume though finite, or None: a learning rate far too high grows
        them by orders of magnitude in the steps before the loss turns non-finite (lr=1e30: weights near 5e29)."""
        now = self.largest_weight()
        if now > 1e3 * max(self.scale_at_start, 1e-3) or now > 1e6:
            return (f"the largest weight is {now:.3g}, against {self.scale_at_start:.3g} when this training started "
                    f"at step {self.start_step}")
        return None

    def close(self) -> None:
        """Close history.jsonl (`fit` does, however it ends)."""
        if self.history_file is not None:
            self.history_file.close()
            self.history_file = None

    def finish(self) -> TrainResult:
        t, acc, result = self.tcfg, self.accelerator, self.result
        if t.log_with:
            acc.end_training()
        result.seconds, result.steps = self.previous_seconds + time.perf_counter() - self.began, t.max_steps
        vocab = self.vocab_size or self.student.get_output_embeddings().weight.shape[0]
        result.collapsed = collapse_reason(result.history, vocab, tcfg=self.tcfg)
        if result.collapsed and acc.is_main_process:
            tqdm.write(f"WARNING: the student collapsed: {result.collapsed}.")
        trained = acc.unwrap_model(self.model).model
        if t.gradient_checkpointing:
            trained.gradient_checkpointing_disable()
            trained.config.use_cache = True
        result.student = whole_student(acc, self.model, trained)
        trained.eval()
        return result


def whole_student(accelerator, prepared: torch.nn.Module, trained: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The trained student as one ordinary model. Under FSDP the prepared model is sharded in place across the
    processes, so its full state is gathered (every process takes part) and loaded on process 0 into an
    unsharded copy; evaluation and save_pretrained then see every weight. Other processes get None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return trained
    state = accelerator.get_state_dict(prepared)  # gathered to process 0 (full state dict, on the CPU)
    return unsharded_copy(trained, state) if accelerator.is_main_process else None


def unsharded_copy(model: torch.nn.Module, wrapped_state: dict) -> torch.nn.Module:
    """A fresh fp32 model of `model`'s architecture holding `wrapped_state` (keys of the DistillStep wrapper,
    "model." first, as the prepared module names them)."""
    from transformers import AutoModelForCausalLM

    state = {k.removeprefix("model."): v for k, v in wrapped_state.items()}
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"The gathered student state does not match its architecture (missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}).")
    fresh.generation_config = model.generation_config
    return fresh.eval()


def _divergence_message(step: int, total: float, ce: float, kd: float, grad_norm: float, tcfg, compute: str,
                        path: Optional[Path], again: bool = False, damaged: Optional[str] = None) -> str:
    precision = f"mixed precision {compute}" if compute in ("bf16", "fp16") else "fp32"
    what = "loss" if not math.isfinite(total) else "gradient norm"
    lower = f"{tcfg.lr / 10:g}"
    if damaged and not again:
        where = (f"The weights are finite but already damaged by the updates before ({damaged}), so they were not "
                 f"saved: resuming from them cannot recover. Start again without --resume (notebook: without "
                 f"'train.resume=true' in TRAIN_OVERRIDES) with train.lr={lower} or lower.")
    elif again:
        where = (f"This is the first step after resuming from a divergence checkpoint: the weights saved there were "
                 f"already damaged by the update before it (a learning rate this high breaks weights before the loss "
                 f"shows it). Start again without --resume (notebook: without 'train.resume=true' in TRAIN_OVERRIDES), "
                 f"with train.lr={lower} or lower (or resume from an earlier checkpoint moved into place).")
    elif path:
        where = (f"The weights after step {step} (all finite: the diverged step was never applied) are saved in "
                 f"{path}. Continue from them with a lower learning rate: --resume --set train.lr={lower} --set "
                 f"'train.resume_allow=[train.lr]' (notebook: TRAIN_OVERRIDES = ['train.resume=true', "
                 f"'train.lr={lower}', 'train.resume_allow=[train.lr]'] in the Distillation cell).")
    else:
        where = "Give a checkpoint folder to keep the last good weights."
    return (f"Non-finite {what} at step {step + 1} (loss {total}, ce {ce}, kd {kd}, gradient norm {grad_norm}); the "
            f"optimizer step was not taken. Likely causes: a learning rate too high for this model (train.lr="
            f"{tcfg.lr}; try 10x lower or more train.warmup_steps), or overflow in {precision} (fp16 overflows "
            f"first; use bf16 or fp32). {where}")


def _resume(folder: Optional[Path], cfg, student, optimizer, say, divergence: Optional[Divergence] = None,
            contents: Optional[dict] = None) -> dict:
    """Load the newest valid checkpoint of this run into the student and optimizer.

    Refuses a checkpoint written with other settings, naming each difference, unless the setting is listed
    in train.resume_allow; allowed changes of the optimizer and schedule take effect from here on."""
    tcfg = cfg.train
    if folder is None:
        raise ValueError("Resuming needs the run folder that holds the checkpoints (folder=).")
    path = ckpt.newest_valid(folder, log=say)
    if path is None:
        raise ckpt.CheckpointError(f"resume: no valid checkpoint in {folder}, so there is nothing to continue (the "
                                   f"history there is left as it is). Run without --resume (notebook: without "
                                   f"'train.resume=true' in TRAIN_OVERRIDES) to start from step 0.")
    saved = ckpt.trainer_state(path)
    current, before = training_fingerprint(cfg, divergence, contents), saved.get("fingerprint") or {}
    if "fingerprint" in saved and not set(CONTENTS) & set(before):  # written before contents were fingerprinted
        say(f"resume: {path.name} predates content fingerprints; the data and teacher it read cannot be checked")
        current = {k: v for k, v in current.items() if k not in CONTENTS}
        before = {k: v for k, v in before.items() if k.split(".")[0] in ("student", "loss", "train")}
    diff = fingerprint_differences(before, current) if "fingerprint" in saved else {}
    refused = {k: v for k, v in diff.items() if k not in tcfg.resume_allow}
    if refused:
        listed = "; ".join(f"{k} ({CONTENTS[k]}): checkpoint {a!r}, now {b!r}" if k in CONTENTS else
                           f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ckpt.CheckpointError(
            f"resume: {path} was written with other settings ({listed}). Resume with the settings it was trained "
            f"with, start a new run without --resume (the old checkpoints are moved aside), or continue on purpose "
            f"with --set 'train.resume_allow=[{', '.join(refused)}]' (notebook: add 'train.resume_allow=["
            f"{', '.join(refused)}]' to TRAIN_OVERRIDES).")
    if "fingerprint" not in saved:
        say(f"resume: {path.name} predates configuration fingerprints; its settings cannot be checked")
    state = ckpt.load_checkpoint(path, student, optimizer)
    if diff:  # the lr follows the current config at every step; the betas and weight decay are set here
        for group in optimizer.param_groups:
            group["betas"] = tuple(tcfg.betas)
        optimizer.param_groups[0]["weight_decay"] = tcfg.weight_decay  # group 0 holds the decayed weights
        changes = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        say(f"resume: continuing with changed settings: {changes}")
    say(f"resume: continuing from {path} (step {state['step']} of {tcfg.max_steps})")
    return {**state, "path": str(path), "run_id": saved.get("run_id") or uuid.uuid4().hex[:12]}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"loss": {"alpha": 0.5}} -> {"loss.alpha": 0.5}, scalars only (what trackers accept)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:  # None and lists as text
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
