"""The experiment: one object whose methods are the notebook's sections, shared by the notebook (one call per
cell) and the headless CLI (`run` is the methods in order); `Experiment`'s docstring shows its use. The functions
before the class are its stages, usable on their own (and in tests)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoints import list_checkpoints
from .config import Config, ConfigError, GenerateConfig, apply_overrides, get_preset
from .data import (DataError, Example, LoadReport, TokenizedSplit, format_prompt, handle_duplicates,
                   hold_out_prompts, load_examples, load_mmlu, remove_overlap, tokenize_examples)
from .batches import AnswerHidden, scored_tokens
from .evaluate import Agreements, Known, agreements, evaluate_model, perplexity, teacher_on_student_samples
from .export import (EQUALIZE_QUANTS, EQUALIZE_ROWS, Equalization, ExportError, ExportReport, detach_fake_quant,
                     equalization, export_gguf, export_run, fake_quantized, gguf_file_name, teacher_gguf,
                     tensor_quant)
from .files import write_json
from .generate import (answers_path, default_stop, generate, generate_answers, generate_texts, read_prompts,
                       texts_path)
from .losses import Divergence, divergence_name
from .hub import HubUnavailableError
from .models import (ModelInfo, ModelLoadError, VocabMismatchError, VocabReport, check_vocab_compatible,
                     device_capability, load_teacher, offload, resolve_device, resolve_mixed_precision,
                     resolve_precision)
from .plan import MemoryPlan, PlanError, memory_plan
from .timeplan import Lengths, TimePlan, TimePlanError, compared, time_plan
from .plots import plot_mmlu_subjects, plot_quality, plot_size_quality, plot_training, save_figure
from .report import (BASELINE_LABEL, RANDOM_INIT_LABEL, preflight_warnings, results_table, side_by_side,
                     summarize)
from .runfolder import is_main_process, join_process_group, main_process_first, run_dir, save_outputs, start_run
from .students import load_student
from .teacher_cache import Fidelity, Share, TopKCache, build_topk_cache, built_share
from .train import HeldOut, OpenedStep, Trainer, TrainingInterrupted, TrainResult, Vocab, open_step

OPENING_WORDS = 8  # side by side, a free text without a prompt is continued from this many of its first words
MMLU_FIX = ("Set eval.mmlu_source to a local JSONL of cais/mmlu's schema (question, choices, answer, subject), or "
            "eval.mmlu_source=null to skip MMLU.")


def baseline_kind(cfg: Config) -> str:
    """What the baseline is: "random" (teacher-written free text with a pruned config student: the same student
    shape from random init, same data and steps, so the table shows what pruning buys), "reference" (sequence-level
    KD: plain fine-tuning on the reference answers of the same questions, not on the teacher's answers) or
    "plain" (plain fine-tuning on the training targets)."""
    if cfg.data.source == "teacher_text" and cfg.student.source == "config" and cfg.student.init == "prune":
        return "random"
    return "reference" if cfg.data.targets != "reference" and cfg.data.source != "teacher_text" else "plain"


def configure(preset: str = "pocket", overrides: Sequence[str] | dict | None = None) -> Config:
    """The named preset with `section.key=value` overrides applied and validated."""
    cfg = get_preset(preset)
    return apply_overrides(cfg, overrides) if overrides else cfg


class PlanDoesNotFit(RuntimeError):
    """The memory plan says a stage does not fit this machine; the message lists the knobs that would fit."""


def check_memory(cfg: Config, force: bool = False, verbose: bool = True) -> Optional[MemoryPlan]:
    """Print the memory plan of `cfg` on this machine and refuse, before anything loads, a plan that does not fit
    (unless `force`). Device and precision settings this machine cannot run (train.device=cuda without a GPU, an
    8-bit teacher or fp16 training on CPU, bf16 on a T4) are refused here too, before anything loads."""
    device = resolve_device(cfg.train.device)
    resolve_precision(cfg.teacher.precision, device, "teacher")
    resolve_mixed_precision(cfg.train.mixed_precision, device.type, device_capability(device))
    try:
        plan = memory_plan(cfg)
    except PlanError as exc:
        if verbose:
            print(f"memory plan: skipped ({exc})")
        return None
    if verbose:
        print(plan)
    if not plan.fits and not force:
        fixes = " ".join(f"--set {f}" for f in plan.fixes if "=" in f)
        raise PlanDoesNotFit(f"{plan.verdict}. " + (f"Try: {fixes}. " if fixes else "")
                             + "Or force the run (CLI --force, run(..., force=True)) to try anyway.")
    return plan


def plan_time(cfg: Config, lengths: Optional[Lengths] = None, verbose: bool = True) -> Optional[TimePlan]:
    """Print the time plan of `cfg` on this machine (per section; with `lengths`, the tokenized splits'), or why
    there is none. The processes of `accelerate launch` / torchrun share the cache build; training takes the same
    steps (each process takes batch_size rows of a larger global batch)."""
    try:
        plan = time_plan(cfg, lengths=lengths, processes=int(os.environ.get("WORLD_SIZE", "1")))
    except (PlanError, TimePlanError) as exc:
        if verbose:
            print(f"time plan: skipped ({exc})")
        return None
    if verbose:
        print(plan)
    return plan


@contextlib.contextmanager
def visiting(model: torch.nn.Module, device: torch.device | str):
    """Bring `model` to `device` for the block and back to where it was after (the untrained student rests on
    the host between its evaluations, so the accelerator holds only what the stage uses)."""
    home = next(model.parameters()).device
    offload(model, device)
    try:
        yield model
    finally:
        offload(model, home)


@dataclass
class RawData:
    """Examples before tokenization, with the loaders' reports."""

    train: list[Example]
    eval: list[Example]
    reports: list[LoadReport]
    mmlu: Optional[list[Example]] = None  # MMLU questions for evaluation (eval.mmlu_source)


def load_data(cfg: Config, verbose: bool = True) -> RawData:
    """Training and held-out examples as cfg.data says; prints one line per source. With data.source=teacher_text
    both splits are empty here: the teacher writes them in `teacher_answers` (section 3b)."""
    if cfg.data.source == "teacher_text":
        if verbose:
            print(f"data: the teacher will write {cfg.generate.num_samples} texts (section 3b); whole prompts are "
                  f"held out until at least {cfg.data.eval_size} texts are")
        return RawData([], [], [])
    train, train_report = load_examples(cfg.data, "train")
    held_out, eval_report = load_examples(cfg.data, "eval")
    train = handle_duplicates(train, train_report, cfg.data.duplicates)
    held_out = handle_duplicates(held_out, eval_report, cfg.data.duplicates)
    train = remove_overlap(train, held_out, train_report)
    reports = [train_report, eval_report]
    mmlu = None
    if cfg.eval.mmlu_source:
        mmlu, mmlu_report = load_mmlu("test", path=None if cfg.eval.mmlu_source == "hub" else cfg.eval.mmlu_source,
                                      subjects=cfg.eval.mmlu_subjects, limit=cfg.eval.mmlu_samples or None,
                                      bad_rows=cfg.data.bad_rows, fix=MMLU_FIX, seed=cfg.eval.mmlu_seed)
        reports.append(mmlu_report)
    for report in reports if verbose else ():
        print(f"data: {report}")
    return RawData(train, held_out, reports, mmlu)


@dataclass
class Splits:
    train: TokenizedSplit
    eval: TokenizedSplit
    gsm_shots: list[Example] = field(default_factory=list)  # few-shot examples (from the training rows)
    mmlu: Optional[list[Example]] = None  # MMLU questions scored by letter


def tokenize(cfg: Config, raw: RawData, tokenizer, verbose: bool = True) -> Splits:
    """Tokenize both splits with the student's tokenizer (prompts masked); prints what was skipped.

    The training split uses data.max_length and data.overlong; the held-out split uses eval.max_length
    (longer rows skipped and counted), so evaluation is not biased towards the short problems."""
    d = cfg.data
    splits = []
    for name, examples, limit in (("train", raw.train, d.max_length), ("eval", raw.eval, cfg.eval.max_length)):
        report = LoadReport(source=f"{name} split, max_length={limit}", rows=len(examples))
        split = tokenize_examples(examples, tokenizer, limit, d.overlong if name == "train" else "skip",
                                  d.system_prompt, report)
        if verbose:
            print(f"tokens: {report}; {split.answer_tokens:,} answer tokens")
        splits.append(split)
    # lm_eval few-shot draws its shots from the whole training pool; "first" shows the first gsm8k_shots rows
    shots = list(raw.train) if cfg.eval.gsm8k_fewshot == "lm_eval" else list(raw.train[:cfg.eval.gsm8k_shots])
    return Splits(*splits, gsm_shots=shots, mmlu=raw.mmlu)


def cache_dir(cfg: Config) -> Path:
    """Folder of teacher caches and generated answers, shared by the runs under run.out_dir."""
    return Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else Path(cfg.run.out_dir) / "teacher_cache"


def teacher_key(cfg: Config, info: Optional[ModelInfo] = None) -> dict:
    """What identifies the teacher in cache fingerprints besides its weights."""
    return {"source": cfg.teacher.source, "revision": cfg.teacher.revision,
            "precision": info.precision if info else cfg.teacher.precision}


def teacher_answers(cfg: Config, raw: RawData, teacher: torch.nn.Module, teacher_tokenizer,
                    info: Optional[ModelInfo] = None, progress: bool = True) -> RawData:
    """Sequence-level distillation (data.targets=teacher / teacher_correct): the teacher's generated answers replace the
    training targets; the held-out split keeps its reference answers. With data.source=teacher_text the teacher writes
    generate.num_samples texts, split by prompt into training and held-out (`data.hold_out_prompts`)."""
    if cfg.data.source == "teacher_text":
        texts, report = generate_texts(teacher, teacher_tokenizer, read_prompts(cfg.generate.prompts), cache_dir(cfg),
                                       cfg.generate, teacher_key=teacher_key(cfg, info), progress=progress)
        print(report)
        train, held_out, note = hold_out_prompts(texts, cfg.data.eval_size, cfg.data.train_seed)
        train = train[:cfg.data.train_size]
        reports = [LoadReport(source=f"teacher texts ({report.path})", rows=len(texts), kept=len(train),
                              notes=[note])]
        print(f"data: {reports[0]}")
        return RawData(train, held_out, reports)
    if cfg.data.targets == "reference":
        return raw
    train, report = generate_answers(teacher, teacher_tokenizer, raw.train, cache_dir(cfg), cfg.generate,
                                     keep="correct" if cfg.data.targets == "teacher_correct" else "all",
                                     system_prompt=cfg.data.system_prompt, teacher_key=teacher_key(cfg, info),
                                     progress=progress)
    print(report)
    if not train:
        raise DataError(f"data.targets={cfg.data.targets}: none of the teacher's {report.rows} answers was kept "
                        f"({report.rejected}). Use data.targets=teacher (keep all) or a stronger teacher.")
    return RawData(train, raw.eval, raw.reports, raw.mmlu)


def answers_on_disk(cfg: Config, raw: RawData, teacher: torch.nn.Module, teacher_tokenizer,
                    info: Optional[ModelInfo] = None) -> Optional[Path]:
    """Where `teacher_answers` will find the teacher's texts or answers already written (for the time plan), or
    None: none there, or no generation in this run."""
    if cfg.data.source == "teacher_text":
        path = texts_path(teacher, teacher_tokenizer, read_prompts(cfg.generate.prompts), cache_dir(cfg),
                          cfg.generate, teacher_key(cfg, info))
    elif cfg.data.targets != "reference":
        path = answers_path(teacher, teacher_tokenizer, raw.train, cache_dir(cfg), cfg.generate,
                            cfg.data.system_prompt, teacher_key(cfg, info))
    else:
        return None
    return path if path.is_file() else None


def vocabulary(cfg: Config, teacher_tokenizer, tokenizer, teacher: torch.nn.Module,
               student: torch.nn.Module, verbose: bool = True) -> Optional[VocabReport]:
    """The shared-vocabulary report; None where the tokenizers differ and only sequence-level
    distillation is configured (data.targets=teacher*, loss.alpha=1), which needs no shared vocabulary."""
    try:
        report = check_vocab_compatible(teacher_tokenizer, tokenizer, teacher, student)
    except VocabMismatchError as exc:
        if cfg.data.targets != "reference" and cfg.loss.alpha != 1.0:
            raise VocabMismatchError(f"{str(exc).split(' Logit distillation')[0]} data.targets={cfg.data.targets} is "
                                     f"already set, but loss.alpha={cfg.loss.alpha} still asks for the token-level "
                                     f"term: set loss.alpha=1 to train on the teacher's answers alone.") from None
        if cfg.data.targets == "reference":
            raise
        print("vocabulary: the tokenizers differ; sequence-level distillation only (CE on the teacher's answers)")
        return None
    if verbose:
        print(f"vocabulary: {report}")
    return report


def teacher_cache(cfg: Config, teacher: torch.nn.Module, splits: Splits, tokenizer,
                  info: Optional[ModelInfo] = None, shared_vocab: bool = True,
                  progress: bool = True, verbose: bool = True) -> Optional[TopKCache]:
    """Build or reuse the teacher's top-k cache of the training split (teacher_cache.use); prints its report."""
    if not cfg.teacher_cache.use or not shared_vocab:
        if verbose:
            print("teacher cache: off" + ("" if shared_vocab else " (no shared vocabulary)")
                  + "; the teacher runs live")
        return None
    tc = cfg.teacher_cache
    cache = build_topk_cache(teacher, splits.train, cache_dir(cfg), k=tc.k, vocab_size=len(tokenizer),
                             batch_size=tc.batch_size, teacher_key=teacher_key(cfg, info), progress=progress,
                             fidelity=Fidelity(temperature=cfg.loss.temperature), share=Share.current())
    if verbose:
        print(cache.report)
    return cache


@contextlib.contextmanager
def training(cfg: Config, student_init: torch.nn.Module, teacher: Optional[torch.nn.Module], splits: Splits,
             tokenizer, progress: bool = True, cache: Optional[TopKCache] = None,
             park: Optional[torch.nn.Module] = None, divergence: Optional[Divergence] = None,
             teacher_hidden: Optional[AnswerHidden] = None):
    """A `Trainer` of a fresh copy of `student_init` distilled from `teacher` (or its top-k `cache`), writing to
    runs/<name>/: history.jsonl (main process), checkpoints/ (train.checkpoint_every, a non-finite loss, a stop
    signal); train.resume continues from the newest valid one. With train.eval_every the held-out split is scored
    during training (its teacher signal from a cache of the held-out split, or the live teacher; the cache is
    built from `teacher_hidden`, the teacher's held-out hidden states kept by section 5, when they serve).

    For the block, a teacher this training does not run (`teacher` when the cache serves it, or `park`) waits on
    the host when the run is on a GPU; on-policy steps need it live, so then it stays."""
    eval_cache = None
    if cfg.train.eval_every and cache is not None and teacher is not None and is_main_process():
        kept = teacher_hidden is not None and teacher_hidden.serves(teacher, splits.eval)
        eval_cache = build_topk_cache(teacher, teacher_hidden if kept else splits.eval, cache_dir(cfg),
                                      k=cfg.teacher_cache.k, vocab_size=len(tokenizer),
                                      batch_size=cfg.teacher_cache.batch_size, progress=False,
                                      fidelity=Fidelity(rows=0))  # its fidelity report is never shown
    idle = park if cache is None or cfg.train.on_policy > 0 else teacher
    parked = idle if resolve_device(cfg.train.device).type == "cuda" else None
    with visiting(parked, "cpu") if parked is not None else contextlib.nullcontext():
        yield Trainer(copy.deepcopy(student_init), None if parked is not None and parked is teacher else teacher,
                      splits.train, cfg, Vocab.of(tokenizer), teacher_cache=cache,
                      held_out=HeldOut(splits.eval, eval_cache), folder=run_dir(cfg), progress=progress,
                      divergence=divergence)


def trained_student(trainer: Trainer, result: TrainResult, student_init: torch.nn.Module) -> torch.nn.Module:
    """The trained student, back where `student_init` rests (the host); under FSDP a process other than 0 keeps
    its shard where it is."""
    if result.student is None:
        return trainer.student
    return offload(result.student, next(student_init.parameters()).device)


def train_student(cfg: Config, student_init: torch.nn.Module, teacher: Optional[torch.nn.Module], splits: Splits,
                  tokenizer, progress: bool = True, cache: Optional[TopKCache] = None,
                  park: Optional[torch.nn.Module] = None, divergence: Optional[Divergence] = None,
                  teacher_hidden: Optional[AnswerHidden] = None) -> tuple[torch.nn.Module, TrainResult]:
    """`training(...)` fitted in one call: the trained student (on the host) and what the loop reported."""
    with training(cfg, student_init, teacher, splits, tokenizer, progress, cache, park, divergence,
                  teacher_hidden) as trainer:
        result = trainer.fit()
    return trained_student(trainer, result, student_init), result


def evaluate(cfg: Config, label: str, model: torch.nn.Module, tokenizer, splits: Splits,
             progress: bool = True, teacher: Optional[torch.nn.Module] = None, known: Optional[Known] = None) -> dict:
    """One results row for `model`: held-out perplexity and GSM accuracy, MMLU (eval.mmlu_source),
    agreement with `teacher` (students only), size and speed (eval.efficiency); `known`: what the run measured
    already (`evaluate.Known`: a trained student reuses its untrained copy's speed, and its training's last
    held-out perplexity)."""
    with visiting(model, resolve_device(cfg.train.device)):
        known = dataclasses.replace(known or Known(), teacher=teacher)
        return evaluate_model(label, model, tokenizer, splits.eval, cfg.eval, system_prompt=cfg.data.system_prompt,
                              gsm_shots=splits.gsm_shots, mmlu_examples=splits.mmlu, progress=progress, known=known)


def _variant(cfg: Config, name: str, train: dict, **sections) -> Config:
    """`cfg` with the `sections` replaced, train.* changed by `train`, and its own folder runs/<name>/<variant>/
    (no copy of its figures elsewhere). It resumes only when `cfg` resumes and the variant had left a checkpoint:
    one that had not started yet starts, so a resumed run never fails on a variant it had not reached."""
    run = dataclasses.replace(cfg.run, out_dir=str(run_dir(cfg)), name=name, figures_dir=None)
    started = bool(list_checkpoints(Path(run.out_dir) / run.name / "checkpoints"))
    return dataclasses.replace(cfg, run=run, train=dataclasses.replace(  # replace validates the new Config
        cfg.train, resume=cfg.train.resume and started, **train), **sections)


def baseline_config(cfg: Config) -> Config:
    """Plain fine-tuning beside `cfg`'s distillation: loss.alpha=1 (the KD term measured without gradient), no
    on-policy steps; the same data, steps, schedule, seed and checkpoint interval, in runs/<name>/baseline."""
    return _variant(cfg, "baseline", {"on_policy": 0.0}, loss=dataclasses.replace(cfg.loss, alpha=1.0))


def random_init_config(cfg: Config) -> Config:
    """The same student shape from random weights (student.init=random) with `cfg`'s loss, data, steps and
    schedule, in runs/<name>/baseline."""
    return _variant(cfg, "baseline", {}, student=dataclasses.replace(cfg.student, init="random"))


def preview_config(cfg: Config, steps: int) -> Config:
    """The on-policy preview of `cfg`: every step on the student's own samples (train.on_policy=1), reverse KL at
    T=1, alpha at most 0.5, `steps` steps scored once at the end, no periodic checkpoints (a stop signal still
    saves one); lr is `cfg`'s, warm-up too but at most a quarter of `steps`. In runs/<name>/on_policy_preview."""
    changes = {"on_policy": 1.0, "max_steps": steps, "eval_every": steps, "checkpoint_every": 0,
               "warmup_steps": min(cfg.train.warmup_steps, steps // 4)}
    return _variant(cfg, "on_policy_preview", changes,
                    loss=dataclasses.replace(cfg.loss, divergence="reverse_kl", temperature=1.0,
                                             alpha=min(cfg.loss.alpha, 0.5)))


# The notebook's sections, in order: (method, title). `Experiment.run()` calls them in this order.
SECTIONS = (("configure", "1. Configuration"), ("load_data", "2. Data"), ("load_teacher", "3. Teacher"),
            ("teacher_answers", "3b. Teacher answers"), ("load_student", "4. Student and tokenization"),
            ("build_cache", "4b. Teacher cache"), ("evaluate_before", "5. Before training"),
            ("preflight", "5b. Preflight"), ("distil", "6. Distillation"), ("train_baseline", "6b. Baseline"),
            ("on_policy_preview", "6c. On-policy preview"), ("evaluate_after", "7. Evaluation after"),
            ("plots", "8. Plots"), ("side_by_side", "9. Side by side"), ("save", "10. Save"))
_TITLES = {**dict(SECTIONS), "heal": "11. Ship it: healing"}  # heal is called on its own, not by run()
TRAINING_SECTIONS = ("loss", "train")  # what the training cell may override; the rest is fixed by earlier cells
_FIXED_BY = {"data": "2. Data", "teacher": "3. Teacher", "student": "4. Student and tokenization",
             "teacher_cache": "4b. Teacher cache", "generate": "3b. Teacher answers", "eval": "5. Before training",
             "run": "1. Configuration", "preset": "1. Configuration"}


@dataclass
class TeacherStage:
    """Section 3: the frozen teacher, its tokenizer and what was loaded."""

    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo


@dataclass
class StudentStage:
    """Section 4: the untrained student (resting on the host), its tokenizer, whether it shares the teacher's
    vocabulary, and both splits tokenized with its tokenizer."""

    init: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    shared: bool
    splits: Splits


def _need(value: Any, method: str) -> Any:
    """`value`, a stage's result, or a RuntimeError naming the section that builds it."""
    if value is None:
        raise RuntimeError(f"Run section {_TITLES[method]} first (Experiment.{method}()).")
    return value


def _built(stage: str, field: str, method: str) -> property:
    """``exp.<name>``: a field of one of the experiment's stage results (``exp.splits`` is
    ``exp.student_stage.splits``), or a RuntimeError naming the section to run first."""
    return property(lambda exp: getattr(_need(getattr(exp, stage), method), field))


@dataclass
class Trained:
    """One training run of the experiment: the config it used (the experiment's plus the cell's overrides), the
    overrides themselves, the trained student and what the loop reported."""

    cfg: Config
    overrides: list[str]
    student: torch.nn.Module
    result: TrainResult
    divergence: Optional[Divergence] = None  # a divergence given to `distil` instead of loss.divergence

    @property
    def divergence_label(self) -> Optional[str]:
        """The name of the divergence function the training used in place of loss.divergence, if any."""
        return None if self.divergence is None else f"{divergence_name(self.divergence)} (custom)"


class StageAlreadyBuilt(ConfigError):
    """An override of the training cell names a setting that an earlier stage has already used."""


class Experiment:
    """One experiment, the notebook's sections as methods; `run()` is all of them in order.

        exp = Experiment(configure("pocket", ["loss.alpha=0.3"]))
        exp.configure(); exp.load_data(); exp.load_teacher(); exp.teacher_answers(); exp.load_student()
        exp.build_cache(); exp.evaluate_before()
        trained = exp.distil(["loss.temperature=4"])   # re-run with other loss.* / train.* at will
        exp.train_baseline(); exp.evaluate_after(); exp.plots(); exp.side_by_side(); exp.save()

    `cfg` is never rebound: `distil(overrides)` trains with a copy, and the baseline, figures and saved outputs
    follow that training's config. Each method can be called again: it reuses what earlier stages built (the
    teacher is loaded once) and replaces only its own results. Resume and device are read from the config
    (`train.resume`, `train.device`) and nowhere else.

    Under ``accelerate launch`` / torchrun every process loads the data and models and trains its shard of each global
    batch; only the main process builds caches (the others wait and reuse them), evaluates, and writes files.

    Each section's result is one typed value (`raw`, `train_raw`, `teacher_stage`, `student_stage`, `cache`, `trained`,
    `baseline`, `results`, ...); `teacher`, `tokenizer`, `splits` and the like read the stage that built them."""

    teacher = _built("teacher_stage", "model", "load_teacher")
    teacher_tokenizer = _built("teacher_stage", "tokenizer", "load_teacher")
    teacher_info = _built("teacher_stage", "info", "load_teacher")
    student_init = _built("student_stage", "init", "load_student")
    tokenizer = _built("student_stage", "tokenizer", "load_student")
    student_info = _built("student_stage", "info", "load_student")
    shared = _built("student_stage", "shared", "load_student")
    splits = _built("student_stage", "splits", "load_student")

    def __init__(self, cfg: Config, *, progress: bool = True, force: bool = False, announce: bool = False):
        self.cfg, self.force, self.announce = cfg, force, announce
        self.main = is_main_process()
        self.progress = progress and self.main
        self.say = print if self.main else (lambda *a, **k: None)
        self.device = resolve_device(cfg.train.device)
        self.timings: dict[str, float] = {}
        self.speed: dict = {}  # speed and size figures by architecture (evaluate.architecture_key, evaluate.Known)
        self.time_plan: Optional[TimePlan] = None  # planned seconds per section (made again once data are tokenized)
        self.raw: Optional[RawData] = None  # 2. Data
        self.train_raw: Optional[RawData] = None  # 3b. the training rows (the teacher's answers, or the data's)
        self.teacher_stage: Optional[TeacherStage] = None  # 3. Teacher
        self.student_stage: Optional[StudentStage] = None  # 4. Student and tokenization
        self.cache: Optional[TopKCache] = None  # 4b. Teacher cache (None also when teacher_cache.use is off)
        self.results: dict[str, dict] = {}
        # 5. the teacher's hidden states at the held-out answers, kept by its agreement pass: the held-out cache and
        # the trained students' agreement rebuild its logits from them instead of running it again
        self.teacher_hidden: Optional[AnswerHidden] = None
        self.trained: Optional[Trained] = None
        self.baseline: Optional[Trained] = None
        self.figures: dict[str, Any] = {}
        self.checks: Optional[dict] = None  # 5b. Preflight
        self.preview: Optional[dict] = None  # 6c. On-policy preview
        self.comparison = None  # 9. Side by side (a DataFrame)
        self.healed: dict[str, dict] = {}  # heal(): each healing's figures
        self.healed_student: Optional[torch.nn.Module] = None  # the last healing's student (one kept, not each)
        self._unhealed: dict[tuple, tuple] = {}  # (student, quant, equalized) -> fp32 and file perplexity, scales
        self.out = run_dir(cfg)

    @contextlib.contextmanager
    def _timed(self, method: str):
        """Time a section (kept in `timings`) and, when `announce` is set, print its start and end."""
        title = _TITLES[method]
        if self.announce and self.main:
            print(f"== {title}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[title] = time.perf_counter() - start
            if self.announce and self.main:
                print(f"== {title}: {self.timings[title]:.1f} s", flush=True)

    def configure(self) -> Path:
        """Check the memory plan (refusing one that does not fit unless `force`) and open the run folder:
        config.yaml (with each knob's help) and environment.json; nothing already in the folder is deleted."""
        with self._timed("configure"):
            check_memory(self.cfg, force=self.force, verbose=self.main)
            if self.student_stage is not None:  # a re-run of this cell keeps the real lengths
                self._replan()
            else:
                self.time_plan = plan_time(self.cfg, None, verbose=self.main)
            self.out = start_run(self.cfg) if self.main else run_dir(self.cfg)
            self.say(f"preset {self.cfg.preset}, run folder {self.out}")
            return self.out

    def load_data(self) -> RawData:
        with self._timed("load_data"):
            self.raw = self.train_raw = load_data(self.cfg, verbose=self.main)
            return self.raw

    def load_teacher(self):
        """The frozen teacher, loaded once per experiment (calling again reuses it)."""
        with self._timed("load_teacher"):
            if self.teacher_stage is None:
                self.teacher_stage = TeacherStage(*load_teacher(self.cfg.teacher, self.device))
            self.say(self.teacher_info)
            return self.teacher

    def teacher_answers(self) -> RawData:
        """With data.targets=teacher*, the teacher's answers become the training targets (cached on disk)."""
        with self._timed("teacher_answers"):
            raw = _need(self.raw, "load_data")
            if self.time_plan is not None and "3b. Teacher answers" not in self.timings:
                found = answers_on_disk(self.cfg, raw, self.teacher, self.teacher_tokenizer, self.teacher_info)
                self._reused("3b. Teacher answers", 1.0 if found else 0.0, found)
            with main_process_first():
                self.train_raw = teacher_answers(self.cfg, raw, self.teacher, self.teacher_tokenizer,
                                                 self.teacher_info, self.progress)
            return self.train_raw

    def load_student(self) -> Splits:
        """The untrained student (resting on the host; it visits the GPU to be evaluated), the vocabulary
        report, and both splits tokenized with the student's tokenizer."""
        with self._timed("load_student"):
            teacher = self.teacher
            s, raw = self.cfg.student, _need(self.train_raw, "load_data")
            calibration = None
            if (s.source == "derive" and s.layer_selection == "importance") or (s.source == "config"
                                                                                  and s.init == "prune"):
                calibration = [(format_prompt(self.teacher_tokenizer, e.question, self.cfg.data.system_prompt)
                                if e.answer else e.question) + e.target  # free text has no prompt template
                               for e in raw.train[:s.calibration_rows]]  # what the importance measurements read
            init, tokenizer, info = load_student(s, teacher, self.teacher_tokenizer, self.device, calibration)
            offload(init, "cpu")
            self.say(info)
            shared = vocabulary(self.cfg, self.teacher_tokenizer, tokenizer, teacher, init,
                                verbose=self.main) is not None
            self.student_stage = StudentStage(init, tokenizer, info, shared,
                                              tokenize(self.cfg, raw, tokenizer, verbose=self.main))
            self._replan()
            return self.splits

    def _replan(self) -> None:
        """The time plan made again with the tokenized splits' lengths (and the MMLU questions loaded): sections
        already run keep what was planned for them; the teacher cache, when it has not run yet, is looked for on
        disk (whole or partly built) and planned as such."""
        earlier, splits = self.time_plan, self.splits
        self.time_plan = plan_time(self.cfg, Lengths.of(splits.train, splits.eval, splits.mmlu), self.main)
        if earlier is not None and self.time_plan is not None:
            self.time_plan.keep(earlier, self.timings)
        tc = self.cfg.teacher_cache
        if self.time_plan is not None and tc.use and self.shared and "4b. Teacher cache" not in self.timings:
            self._reused("4b. Teacher cache", *built_share(self.teacher, splits.train, cache_dir(self.cfg), tc.k,
                                                           len(self.tokenizer), tc.batch_size,
                                                           teacher_key(self.cfg, self.teacher_info)))

    def _reused(self, title: str, share: float, where) -> None:
        """The time plan told that section `title` finds `share` of its work on disk (before it runs)."""
        line = self.time_plan.reuse(title, share, where) if self.time_plan is not None else None
        if line:
            self.say(line)

    def build_cache(self) -> Optional[TopKCache]:
        with self._timed("build_cache"):
            splits = self.splits
            join_process_group()  # every process builds its share of the cache
            self.cache = teacher_cache(self.cfg, self.teacher, splits, self.tokenizer, self.teacher_info,
                                       self.shared, self.progress, verbose=self.main)
            return self.cache

    @property
    def agree_with(self) -> Optional[torch.nn.Module]:
        """The teacher students are compared with token by token (None without a shared vocabulary)."""
        return self.teacher if self.shared else None

    def evaluate_before(self) -> dict[str, dict]:
        """Results rows of the teacher (on the student's tokenization when they share a vocabulary, else on its own)
        and the untrained student (main process only)."""
        with self._timed("evaluate_before"):
            splits = self.splits
            if self.main:
                own = (self.tokenizer, splits) if self.shared else (
                    self.teacher_tokenizer, tokenize(self.cfg, self.train_raw, self.teacher_tokenizer))
                shared = self._agreements(self.cfg, {"student before": self.student_init}, teacher_too=True)
                self.teacher_hidden = shared.teacher_hidden if shared else None
                source = "the pass that measured the untrained student's agreement"
                teacher = Known(self.speed, {**shared.teacher, "from": source} if shared else None)
                self.results["teacher"] = evaluate(self.cfg, "teacher", self.teacher, *own, self.progress,
                                                   known=teacher)
                mine = shared.students["student before"] if shared else None
                scored = None if mine is None else {**mine, "from": "the pass that measured its agreement"}
                student = Known(self.speed, scored, mine)
                self.results["student before"] = evaluate(self.cfg, "student before", self.student_init,
                                                          self.tokenizer, splits, self.progress, self.agree_with,
                                                          student)
            return self.results

    def preflight(self) -> dict:
        """Does the teacher have anything to give? The teacher against the untrained student (from section 5)
        and the teacher's log-likelihood of the student's own samples, with a plain warning when the teacher
        adds little. Kept in results.json."""
        with self._timed("preflight"):
            if not self.main:  # the main process evaluates; the others have nothing to compare
                return self.checks
            _need({"teacher", "student before"} <= set(self.results) or None, "evaluate_before")
            gap = None
            if self.shared:
                with visiting(self.student_init, self.device):
                    gap = teacher_on_student_samples(
                        self.teacher, self.student_init, self.splits.eval, pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id, questions=min(8, len(self.splits.eval)),
                        max_new_tokens=min(64, self.cfg.eval.max_new_tokens), batch_size=self.cfg.eval.batch_size,
                        vocab_size=len(self.tokenizer))
            self.checks = {"samples": gap, "warnings": preflight_warnings(self.results, gap)}
            if gap:
                print(f"preflight: per token of the untrained student's own samples ({gap['samples']} answers of "
                      f"{gap['sample_tokens_mean']:.0f} tokens), log-likelihood {gap['teacher_logprob_per_token']:.2f} "
                      f"under the teacher, {gap['student_logprob_per_token']:.2f} under the student")
            for warning in self.checks["warnings"]:
                print(f"WARNING: {warning}")
            if not self.checks["warnings"]:
                print("preflight: the teacher is clearly ahead of the untrained student; distillation has something to "
                      "transfer.")
            return self.checks

    def open_step(self, rows: int = 4) -> OpenedStep:
        """The first training step opened up (the notebook's "one step" cell): `rows` rows of the first batch, their
        mask, the untrained student's logits and the teacher's signal (the cache's top-k, or the live teacher's
        logits) at the answer positions, as training receives them. The loss functions of `pocket_teacher.losses`
        applied to it give the step's CE, distillation term and total."""
        with visiting(self.student_init, self.device):
            return open_step(self.student_init, self.splits.train, self.cfg, self.tokenizer, rows=rows,
                             teacher=self.agree_with, teacher_cache=self.cache)

    def training_config(self, overrides: Sequence[str] | dict = ()) -> Config:
        """The experiment's config with the training cell's overrides: loss.* and train.* only (except
        train.device); a setting of a stage already built is refused with the cell to change it in."""
        items = list(overrides.items()) if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides]
        for key, *_ in items:
            head = key.split(".")[0]
            if head not in TRAINING_SECTIONS or key == "train.device":
                where = "1. Configuration" if key == "train.device" else _FIXED_BY.get(head, "1. Configuration")
                raise StageAlreadyBuilt(
                    f"{key} cannot change in the training cell: section {where} has already used it. Put it in "
                    f"OVERRIDES of section 1 (Configuration) and re-run from there. The training cell takes "
                    f"loss.* and train.* settings.")
        return apply_overrides(self.cfg, overrides) if items else self.cfg

    def distil(self, overrides: Sequence[str] | dict = (), divergence: Optional[Divergence] = None) -> Trained:
        """Distil a fresh copy of the untrained student with the experiment's config plus `overrides` (loss.*,
        train.*), from the teacher cache when there is one. Returns the new `Trained`; `self.cfg` is unchanged.

        `divergence` replaces the one loss.divergence names: a function ``D(log_p, log_q) -> (N,)`` of the
        teacher's and the student's log-probabilities over the same K outcomes (rows sum to 1 after exp), for
        example written in a notebook cell. The loss is still ``alpha * CE + (1 - alpha) * T^2 * D``; the history's
        kd, the baseline's and the held-out KD are its values."""
        with self._timed("distil"):
            splits = self.splits
            cfg = self.training_config(overrides)
            if divergence is not None and not callable(divergence):
                raise TypeError(f"divergence={divergence!r}: give a function (log_p, log_q) -> per-token values, or "
                                f"set loss.divergence to one of the named divergences.")
            with training(cfg, self.student_init, self.teacher if self.shared else None, splits, self.tokenizer,
                          self.progress, self.cache, divergence=divergence,
                          teacher_hidden=self.teacher_hidden) as trainer:
                result = trainer.fit()  # the training step, opened in section 4c
            student = trained_student(trainer, result, self.student_init)
            self.say(f"{result.steps} steps in {result.seconds:.0f} s; last step: " + ", ".join(
                f"{k} {result.final[k]:.3f}" for k in ("loss", "ce", "kd") if result.final.get(k) is not None))
            named = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides)
            if divergence is not None:
                named.append(f"divergence={divergence_name(divergence)} (a function given to distil)")
            self.trained = Trained(cfg, named, student, result, divergence)
            self.results.pop("student after", None)  # evaluated again by evaluate_after
            return self.trained

    def train_baseline(self) -> Optional[Trained]:
        """Plain fine-tuning (loss.alpha=1) with the last training's steps, data and schedule, when
        eval.baseline is set: what distillation has to beat."""
        with self._timed("train_baseline"):
            trained = _need(self.trained, "distil")
            for label in (BASELINE_LABEL, RANDOM_INIT_LABEL):
                self.results.pop(label, None)
            kind, cfg = baseline_kind(trained.cfg), trained.cfg
            self.baseline = None
            if not cfg.eval.baseline:
                return None
            init, splits, cache = self.student_init, self.splits, self.cache
            variant = random_init_config(cfg) if kind == "random" else baseline_config(cfg)
            if kind == "random":  # same shape, fresh weights, same loss, data and steps as the distillation
                init, _, _ = load_student(variant.student, self.teacher, self.teacher_tokenizer, "cpu")
                self.say("baseline: the same student shape from random init, same loss, data and steps")
            elif kind == "reference":  # the teacher's questions, answered by the references
                asked = {e.question for e in self.train_raw.train}
                reference = RawData([e for e in self.raw.train if e.question in asked], self.raw.eval, self.raw.reports)
                splits, cache = tokenize(cfg, reference, self.tokenizer, verbose=False), None
                self.say(f"baseline: plain fine-tuning on the reference answers of the same {len(reference.train)} "
                         f"questions")
            if kind != "random":
                self.say(f"baseline: plain fine-tuning, loss.alpha=1, {cfg.train.max_steps} steps")
            # plain fine-tuning needs no teacher: it waits on the host (`park`); the random-init student distils
            teacher = self.teacher if kind == "random" and self.shared else None
            student, result = train_student(variant, init, teacher, splits, self.tokenizer, self.progress, cache,
                                            park=None if teacher is not None else self.teacher,
                                            divergence=trained.divergence, teacher_hidden=self.teacher_hidden)
            extra = ["student.init=random"] if kind == "random" else ["loss.alpha=1"]
            self.baseline = None if student is None else Trained(cfg, trained.overrides + extra, student, result)
            return self.baseline

    @property
    def baseline_label(self) -> str:
        return RANDOM_INIT_LABEL if self.trained and baseline_kind(self.trained.cfg) == "random" else BASELINE_LABEL

    def _agreements(self, cfg: Config, students: dict[str, torch.nn.Module],
                    teacher_too: bool = False) -> Optional[Agreements]:
        """The students' agreement with the teacher (and their perplexity) from one pass of the teacher
        (evaluate.agreements), which also scores the teacher's own perplexity; None when evaluation measures no
        agreement. The pass with `teacher_too` (section 5) keeps the teacher's held-out hidden states
        (`self.teacher_hidden`); a later pass rebuilds the teacher's logits from them. The students visit the
        device together."""
        if not (cfg.eval.agreement and self.agree_with is not None):
            return None
        kept = self.teacher_hidden
        if kept is not None and not kept.serves(self.agree_with, self.splits.eval):
            kept = self.teacher_hidden = None  # another teacher or split since: dropped, not held
        with contextlib.ExitStack() as stack:
            for student in students.values():
                stack.enter_context(visiting(student, resolve_device(cfg.train.device)))
            return agreements(self.agree_with, students, self.splits.eval, pad_token_id=self.tokenizer.pad_token_id,
                              vocab_size=len(self.tokenizer), batch_size=cfg.eval.batch_size, progress=self.progress,
                              teacher_hidden=kept, keep_teacher=teacher_too)

    def _final_held_out(self, label: str, trained: Trained) -> Optional[dict]:
        """The held-out perplexity a training scored on its final weights (train.eval_every reaching the last
        step), to reuse in evaluation: the same weights, split, vocabulary and answer tokens."""
        result = trained.result if label == "student after" else self.baseline.result if self.baseline else None
        last = result.history[-1] if result is not None and result.history else {}
        if last.get("step") != trained.cfg.train.max_steps or last.get("eval_ppl") is None:
            return None
        return {"perplexity": last["eval_ppl"], "tokens": scored_tokens(self.splits.eval),
                "from": f"training's held-out score at step {last['step']}"}

    def _trained_students(self, trained: Trained) -> dict[str, torch.nn.Module]:
        """The distilled student and the baseline (fine-tuned, or the same shape from random init) when trained."""
        baseline = {self.baseline_label: self.baseline.student} if self.baseline is not None else {}
        return {"student after": trained.student, **baseline}

    def on_policy_preview(self) -> Optional[dict]:
        """A short on-policy run (eval.on_policy_preview steps; 0 skips): the untrained student samples its own
        answers and the live teacher scores them (train.on_policy=1, reverse KL at T=1, the usual on-policy
        setting), beside the main training's history at the same step. Kept in results.json, not in the table."""
        with self._timed("on_policy_preview"):
            trained = _need(self.trained, "distil")
            steps = self.cfg.eval.on_policy_preview
            if not steps or not self.shared:
                self.preview = None
                self.say("on-policy preview: off (eval.on_policy_preview=0); run it with eval.on_policy_preview=8"
                         if self.shared else "on-policy preview: skipped (the teacher and the student do not share "
                                             "a tokenizer, so the teacher cannot score the student's samples)")
                return None
            student, result = train_student(preview_config(trained.cfg, steps), self.student_init, self.teacher,
                                            self.splits, self.tokenizer, self.progress, self.cache)
            last = result.history[-1]
            rollouts = [h["rollout_tokens_mean"] for h in result.history if h.get("rollout_tokens_mean") is not None]
            same_step = next((h for h in trained.result.history if h["step"] == steps), {})
            self.preview = {"steps": steps, "train_s": result.seconds, "eval_ppl": last.get("eval_ppl"),
                            "eval_reverse_kl": last.get("eval_kd"),
                            "rollout_tokens_mean": sum(rollouts) / len(rollouts) if rollouts else None,
                            "main_eval_ppl_same_step": same_step.get("eval_ppl")}
            self.say(f"on-policy preview: {steps} steps in {result.seconds:.0f} s ({result.seconds / steps:.1f} "
                     f"s/step, rollouts of {self.preview['rollout_tokens_mean']:.0f} tokens on average); held-out "
                     f"perplexity {last.get('eval_ppl', float('nan')):,.2f}" + (
                         f" (the main training at step {steps}: {same_step['eval_ppl']:,.2f})"
                         if same_step.get("eval_ppl") is not None else ""))
            return self.preview

    def evaluate_after(self) -> dict[str, dict]:
        """Results rows of the trained student and the baseline (main process only)."""
        with self._timed("evaluate_after"):
            trained = _need(self.trained, "distil")
            if self.main:
                students = self._trained_students(trained)
                agreed = self._agreements(trained.cfg, students)
                for label, student in students.items():
                    mine = agreed.students[label] if agreed else None
                    scored = self._final_held_out(label, trained) or (
                        None if mine is None else {**mine, "from": "the pass that measured its agreement"})
                    known = Known(self.speed, scored, mine)
                    self.results[label] = evaluate(trained.cfg, label, student, self.tokenizer, self.splits,
                                                   self.progress, self.agree_with, known)
            return self.results

    def table(self):
        """The results so far as a DataFrame (one model per row)."""
        return results_table(self.results.values())

    def plots(self) -> dict[str, Any]:
        """Quality bars, training curves, quality vs size (and latency), per-subject MMLU when scored; saved under
        runs/<name>/figures (and run.figures_dir)."""
        with self._timed("plots"):
            trained, results = _need(self.trained, "distil"), list(self.results.values())
            if not self.main:
                return self.figures
            cfg, divergence = trained.cfg, trained.divergence_label or trained.cfg.loss.divergence
            what = (f"{cfg.preset} preset, {cfg.train.max_steps} steps, {divergence}, alpha={cfg.loss.alpha}, "
                    f"T={cfg.loss.temperature}")
            self.figures = {
                "quality": plot_quality(results, title=f"Teacher vs student ({what})"),
                "training": plot_training(trained.result.history, title=f"Training curves ({what})",
                                          baseline=self.baseline.result.history if self.baseline else None,
                                          baseline_label=self.baseline_label),
                "size": plot_size_quality(results, title=f"Quality vs size ({what})")}
            if any(r.get("latency_ms_per_token") for r in results):
                self.figures["latency"] = plot_size_quality(results, x="latency", title=f"Quality vs latency ({what})")
            if any(r.get("mmlu_per_subject") for r in results):
                self.figures["mmlu"] = plot_mmlu_subjects(results, title=f"MMLU by subject ({what})")
            for name, fig in self.figures.items():
                save_figure(fig, *(Path(d) / f"{name}.png" for d in (run_dir(cfg) / "figures", cfg.run.figures_dir)
                                   if d))
            return self.figures

    def side_by_side(self):
        """Each model's answer to the first eval.side_by_side held-out questions (a DataFrame): the teacher, the
        student before and after, and the baseline (fine-tuned, or the same shape from random init) when trained."""
        with self._timed("side_by_side"):
            trained, k = _need(self.trained, "distil"), self.cfg.eval.side_by_side
            if not (self.main and k):
                return self.comparison
            models = {"teacher": self.teacher, "student before": self.student_init, **self._trained_students(trained)}
            done = {name: [g["output"] for g in (self.results.get(name) or {}).get("generations", [])[:k]]
                    for name in models}
            examples = self.splits.eval.examples[:k]
            if self.cfg.eval.gsm8k_shots == 0 and all(len(v) == len(examples) for v in done.values()):
                self.comparison = side_by_side(examples, done)  # the accuracy runs answered these, greedy, same prompts
                return self.comparison
            text = bool(examples) and not examples[0].answer  # free text: the models continue the raw prompt
            if text:  # a text without its own prompt (data.source=text) is continued from its opening words
                examples = [e if e.question else dataclasses.replace(e, question=" ".join(e.target.split()[
                    :OPENING_WORDS])) for e in examples]
            prompts = [e.question if text else format_prompt(self.tokenizer, e.question, self.cfg.data.system_prompt)
                       for e in examples]
            greedy = GenerateConfig(max_new_tokens=self.cfg.eval.max_new_tokens, batch_size=self.cfg.eval.batch_size)
            stop = default_stop(self.tokenizer, self.cfg.generate.stop) if text else ()
            for name, model in models.items():
                with visiting(model, self.device):
                    done[name] = generate(model, self.tokenizer, prompts, greedy, desc=name, progress=self.progress,
                                          stop=stop)
            self.comparison = side_by_side(examples, done)
            return self.comparison

    def save(self) -> Path:
        """runs/<name>/: the config of the training (config.yaml), results.json / results.md, generations,
        side_by_side.jsonl, timings.json and the student (save_pretrained)."""
        with self._timed("save"):
            trained = _need(self.trained, "distil")
            if not self.main:
                return self.out
            files = {"config.yaml": trained.cfg.to_yaml()}
            if self.comparison is not None:
                files["side_by_side.jsonl"] = self.comparison.to_json(orient="records", lines=True, force_ascii=False)
            files["timings.json"] = json.dumps(self.timings_record(), indent=2)
            extra = {"preflight": self.checks, "on_policy_preview": self.preview,
                     "teacher_cache": dataclasses.asdict(self.cache.report) if self.cache else None,
                     "data": [str(r) for r in (self.train_raw.reports if self.train_raw else [])]}
            out = save_outputs(trained.cfg, trained.student, self.tokenizer, list(self.results.values()),
                               trained.result, overrides=trained.overrides, extra=extra, files=files)
            return out

    def export(self, quant: str = "q8_0", model: str = "student", out: Optional[str | Path] = None,
               equalize: bool = True, embedding: Optional[str] = None) -> ExportReport:
        """The trained student (or, model="baseline", the baseline) as one GGUF file that llama.cpp and Ollama load
        (default runs/<name>/<model>-<quant>.gguf): `python -m pocket_teacher export` does the same from a run
        folder. The tokenizer is copied from the teacher's GGUF when it holds the same vocabulary. A q8_0, q4_0 or
        q4_1 file has its activations equalized (`export.Equalization`: the same function, rounded more gently by
        llama.cpp; scales from the first `EQUALIZE_ROWS` training rows) unless `equalize=False`. `embedding="q8_0"`
        keeps the embedding and output layer at 8 bits in a 4-bit file, as llama.cpp's quantizer keeps a tied one
        (default name <model>-<quant>-embedding-q8_0.gguf)."""
        if model not in ("student", "baseline"):
            raise ValueError(f"export(model={model!r}): use 'student' (the distilled one) or 'baseline'.")
        trained = _need(self.trained, "distil") if model == "student" else _need(self.baseline, "train_baseline")
        tensor_quant("token_embd.weight", quant, embedding)  # an unknown type refused before the calibration
        path = Path(out) if out else self.out / gguf_file_name(model, quant, embedding)
        return self._write_gguf(trained.student, path, quant,
                                f"{self.cfg.run.name} {model}", self._equalization(trained.student, quant, equalize),
                                embedding)

    def calibration_rows(self) -> list[list[int]]:
        """The token ids of the first `EQUALIZE_ROWS` training rows: what an export's equalization measures."""
        train = _need(self.student_stage, "load_student").splits.train
        return [list(train[i]["input_ids"]) for i in range(min(EQUALIZE_ROWS, len(train)))]

    def _equalization(self, student: torch.nn.Module, quant: str, equalize: bool) -> Optional[Equalization]:
        """The scales a `quant` file of `student` is written with: measured on the calibration rows, on the run's
        device; None when `equalize` is off or the type is not one llama.cpp multiplies by 8-bit activations."""
        if not equalize or quant not in EQUALIZE_QUANTS:
            return None
        with visiting(student, self.device):
            return equalization(student, self.calibration_rows())

    def _write_gguf(self, student: torch.nn.Module, path: Path, quant: str, name: str,
                    equalized: Optional[Equalization], embedding: Optional[str] = None) -> ExportReport:
        """`student` as a GGUF file; its tokenizer copied from the teacher's GGUF when it is the same vocabulary."""
        rows = student.config.vocab_size
        return export_gguf(student, self.tokenizer, path, quant, name=name, equalized=equalized, embedding=embedding,
                           tokenizer_gguf=teacher_gguf(self.cfg.teacher.source, self.tokenizer, rows))

    def heal(self, quant: str = "q4_0", steps: int = 50, alpha: Optional[float] = None, lr: Optional[float] = None,
             export: bool = True, equalize: bool = True) -> dict:
        """Heal the quantization gap: distil the trained student `steps` more steps with its weights as a `quant`
        file holds them in the forward pass (the exact GGUF block arithmetic; straight-through gradients to the
        full-precision weights), from the same teacher cache, then (with `export`) write
        runs/<name>/student-<quant>-healed[-alpha<alpha>][-unequalized].gguf. `alpha` (default the training's; 1 is
        plain fine-tuning, the comparison) and `lr` (default a tenth of train.lr, with the training's schedule) set
        the extra steps; the batches come in a new order (train.seed + 1); no checkpoint is kept: a stopped healing
        starts over.
        Returns the held-out perplexities of the fp32 student and of its `quant` file before and after, the gap
        (file minus fp32) each time and the share of it closed; kept in runs/<name>/heal.json under
        heal-<quant>[-alpha<alpha>][-unequalized]. A q8_0 / q4_0 / q4_1 file is equalized as `export` writes it,
        with scales measured on the trained student before healing: the healing forward pass computes that
        equalized file (`attach_fake_quant(equalized=)`) and the healed file is written with the same scales, so it
        holds exactly the weights healing fitted; `equalize=False` heals and writes the weights as trained (files
        ...-unequalized)."""
        with self._timed("heal"):
            trained = _need(self.trained, "distil")
            cfg = trained.cfg
            alpha = cfg.loss.alpha if alpha is None else float(alpha)
            equalized = equalize and quant in EQUALIZE_QUANTS
            suffix = (("" if alpha == cfg.loss.alpha else f"-alpha{alpha:g}")
                      + ("-unequalized" if not equalize and quant in EQUALIZE_QUANTS else ""))
            name = f"heal-{quant}{suffix}"
            variant = _variant(cfg, name, {"max_steps": int(steps), "lr": cfg.train.lr / 10 if lr is None else lr,
                                           "warmup_steps": min(cfg.train.warmup_steps, int(steps) // 4),
                                           "on_policy": 0.0, "eval_every": 0, "checkpoint_every": 0,
                                           "save_final": False, "seed": cfg.train.seed + 1},
                               loss=dataclasses.replace(cfg.loss, alpha=alpha))
            key = (trained.student, quant, equalized)
            if key not in self._unhealed:  # healing again (another alpha) reuses them
                scales = self._equalization(trained.student, quant, equalized)
                self._unhealed[key] = (self._perplexity(trained.student),
                                       self._perplexity(trained.student, quant, scales), scales)
            fp32, before, scales = self._unhealed[key]
            self.say(f"healing the {quant} gap ({before - fp32:+.3f} perplexity): {steps} steps, alpha {alpha}, "
                     f"lr {variant.train.lr:g}, quantization-aware forward"
                     + (f", {scales}" if scales is not None else ", weights as trained"))
            try:  # training's own copy of the student takes the rounding along: one copy, not two
                with fake_quantized(trained.student, quant, scales):
                    healed, result = train_student(variant, trained.student, self.teacher if self.shared else None,
                                                   self.splits, self.tokenizer, self.progress, self.cache)
            except TrainingInterrupted as exc:  # healing is short and never resumed: its advice is to start over
                raise TrainingInterrupted(exc.signum, f"{signal.Signals(exc.signum).name} while healing the {quant} "
                                          f"gap; no healed file was written. Healing starts over from the trained "
                                          f"student: run the same heal again.") from None
            healed = detach_fake_quant(healed)
            after = self._perplexity(healed, quant, scales)
            report = {"quant": quant, "steps": int(steps), "alpha": alpha, "lr": variant.train.lr,
                      "seconds": result.seconds, "fp32_perplexity": fp32, "quantized_before": before,
                      "quantized_after": after, "healed_fp32_perplexity": self._perplexity(healed),
                      "gap_before": before - fp32, "gap_after": after - fp32,
                      "gap_closed": 1 - (after - fp32) / (before - fp32) if before != fp32 else None,
                      "equalized": str(scales) if scales is not None else None}
            if export and self.main:
                report["gguf"] = str(self._write_gguf(healed, self.out / f"student-{quant}-healed{suffix}.gguf",
                                                      quant, f"{cfg.run.name} healed", scales).path)
            self.say(f"{quant} file: perplexity {before:,.3f} -> {after:,.3f} (fp32 {fp32:,.3f}); gap "
                     f"{report['gap_before']:+.3f} -> {report['gap_after']:+.3f}" + (
                         f", {report['gap_closed']:.0%} of it closed" if report["gap_closed"] is not None else ""))
            if self.main:
                self._record_heal(name, report)
            self.healed[name], self.healed_student = report, healed
            return report

    def _perplexity(self, model: torch.nn.Module, quant: Optional[str] = None,
                    equalized: Optional[Equalization] = None) -> float:
        """Held-out perplexity of `model`, or (`quant`) of its weights as a `quant` file holds them (with
        `equalized`, as the equalized file does), rounded as each layer reads them (`export.fake_quantized`: no
        copy of the model)."""
        with visiting(model, self.device), (fake_quantized(model, quant, equalized) if quant
                                            else contextlib.nullcontext()):
            return perplexity(model, self.splits.eval, pad_token_id=self.tokenizer.pad_token_id,
                              vocab_size=len(self.tokenizer), progress=False)["perplexity"]

    def _record_heal(self, name: str, report: dict) -> None:
        path = self.out / "heal.json"
        kept = json.loads(path.read_text()) if path.is_file() else {}
        write_json(path, {**kept, name: report})

    def timings_record(self) -> dict:
        """timings.json: measured seconds per section, and the time plan's beside them (its machine figures and
        whether it had the tokenized lengths)."""
        record: dict[str, Any] = {"sections_s": {k: round(v, 2) for k, v in self.timings.items()}}
        if self.time_plan is not None:
            record.update(planned_s=self.time_plan.seconds(), plan={
                "throughput": dataclasses.asdict(self.time_plan.throughput), "processes": self.time_plan.processes,
                "lengths": "typical" if self.time_plan.typical_lengths else "tokenized"},
                compared=compared(self.time_plan.seconds(), self.timings))
        return record

    def timing_table(self) -> str:
        """Seconds spent in each section so far and their total, beside the time plan's where it has one; the
        total of the sections the plan counts, measured and planned, on a line of its own (the plan does not count
        configuration, data, plots and saving)."""
        planned = self.time_plan.seconds() if self.time_plan is not None else {}
        both = [t for t in self.timings if t in planned]
        width = max([len(t) for t in self.timings] + [len("planned sections")])
        lines = [f"{'section':<{width}}  {'measured':>10}  {'planned':>10}"]
        for title, seconds in self.timings.items():
            plan = f"{planned[title]:8.1f} s" if title in planned else f"{'-':>10}"
            lines.append(f"{title:<{width}}  {seconds:8.1f} s  {plan}")
        if both:
            lines.append(f"{'planned sections':<{width}}  {sum(self.timings[t] for t in both):8.1f} s  "
                         f"{sum(planned[t] for t in both):8.1f} s")
        return "\n".join(lines + [f"{'total':<{width}}  {sum(self.timings.values()):8.1f} s  {'-':>10}"])

    def summary(self) -> str:
        """What this run showed, in sentences generated from its results (the notebook's closing cell)."""
        trained = self.trained
        return summarize(self.results, trained.cfg if trained else self.cfg, trained.result if trained else None,
                         trained.divergence_label if trained else None)

    def run(self) -> dict[str, Any]:
        """Every section in order (what the notebook does top to bottom)."""
        for method, _ in SECTIONS:
            getattr(self, method)()
        if self.main:
            print(self.table().to_string())
            print(self.summary())
            print(self.timing_table())
        return {"out": self.out, "results": list(self.results.values()),
                "history": self.trained.result.history if self.trained else []}


def from_run(run: str | Path, progress: bool = True, calibration_only: bool = False) -> Experiment:
    """The experiment of a finished run folder, rebuilt from its config.yaml up to the teacher cache (the caches on
    disk are reused; nothing in the folder is written), with its saved student as the trained one: what `heal`
    needs. `calibration_only` stops at the tokenized splits, without the cache or the trained student: what an
    export's equalization reads (`calibration_rows`)."""
    from transformers import AutoModelForCausalLM

    run = Path(run)
    if not (run / "config.yaml").is_file() or not any((run / "student").glob("*.safetensors")):
        raise ExportError(f"{run} holds no finished run (config.yaml and student/ are needed): finish the run "
                          f"first (the command that started it, with --resume), then heal.")
    cfg = apply_overrides(Config.from_yaml(run / "config.yaml"),
                          {"run.out_dir": str(run.parent), "run.name": run.name, "train.resume": False})
    exp = Experiment(cfg, progress=progress)
    for method in ("load_data", "load_teacher", "teacher_answers", "load_student"):
        getattr(exp, method)()
    if calibration_only:
        return exp
    exp.build_cache()
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32)
    exp.trained = Trained(cfg, [], student, TrainResult())
    return exp


def export_from_run(run: str | Path, model: str = "student", quant: str = "q8_0", out: Optional[str | Path] = None,
                    equalize: bool = True, progress: bool = True, embedding: Optional[str] = None) -> ExportReport:
    """`export.export_run`, a q8_0 / q4_0 / q4_1 file with its activations equalized (`Experiment.export`): the
    scales are measured on the run's first training rows, which the run's config.yaml rebuilds (`from_run`,
    without the teacher cache or the trained student; the teacher is loaded, as the run's data and student need
    it), once the run folder has been checked. `equalize=False` writes the weights as trained without loading the
    run's data or teacher model. When the rows cannot be rebuilt (data or teacher out of reach), the error says so
    and names --no-equalize. `embedding`: the embedding and output layer's own type (`export.tensor_quant`)."""
    if not equalize or quant not in EQUALIZE_QUANTS:
        return export_run(run, model, quant, out, embedding=embedding)
    return export_run(run, model, quant, out, calibration=functools.partial(_training_rows, run, progress),
                      embedding=embedding)


def _training_rows(run: str | Path, progress: bool) -> tuple[list[list[int]], torch.device]:
    """The run's calibration rows and device (`Experiment.calibration_rows`), its teacher and untrained student
    freed before the trained one is loaded."""
    try:
        exp = from_run(run, progress, calibration_only=True)
    except (DataError, ModelLoadError, HubUnavailableError, OSError) as exc:
        raise ExportError(f"The equalization's scales are measured on {run}'s training rows, and rebuilding them "
                          f"failed ({exc}). Make the run's data and teacher reachable, or export with "
                          f"--no-equalize (the weights as trained).") from exc
    rows, device = exp.calibration_rows(), exp.device
    del exp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, device


def heal_run(run: str | Path, quant: str = "q4_0", steps: int = 50, alpha: Optional[float] = None,
             lr: Optional[float] = None, progress: bool = True, equalize: bool = True) -> dict:
    """`Experiment.heal` on a finished run folder (`from_run`): writes <run>/student-<quant>-healed.gguf (equalized
    as an export is, unless `equalize=False`) and <run>/heal.json; nothing else in the folder changes."""
    return from_run(run, progress).heal(quant, steps, alpha=alpha, lr=lr, equalize=equalize)


def run(cfg: Config, progress: bool = True, resume: Optional[bool] = None, force: bool = False) -> dict[str, Any]:
    """The whole pipeline headless: `Experiment(cfg).run()`, the notebook's sections in order.

    The memory plan is checked first: a plan that does not fit this machine stops the run before anything
    loads (PlanDoesNotFit, naming the knobs that would fit) unless `force`. `resume=True` is train.resume=true."""
    if resume is not None:
        cfg = apply_overrides(cfg, {"train.resume": resume})
    return Experiment(cfg, progress=progress, force=force, announce=True).run()


