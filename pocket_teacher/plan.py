"""The memory plan: peak accelerator memory and host RAM of every stage, counted before anything loads.

    plan = memory_plan(get_preset("t4"), gpu="t4")
    print(plan)            # itemised stages, a verdict, and the knobs that would make it fit
    plan.fits              # False -> `run` refuses to start (unless forced)

Model shapes come from a small table of public facts for the presets' models (`KNOWN_MODELS`), from ``config.json`` in a
local folder or the Hub cache, or from the tiny preset's config, so the plan works offline. Every figure is a count of
bytes: weights at their precision, gradients, optimizer states, activations saved for the backward pass (per token, with
and without gradient checkpointing), the chunked loss's (C, V) buffers, the KV cache of generation, and the CUDA
context. Token counts are the worst case (every row at the length limit) unless the real lengths of the tokenized split
are given (`lengths=`), as the notebook and `run` do once the data are tokenized.

The per-token coefficients were derived from the tensors each layer keeps for backward and checked
against measured peaks (``benchmarks/memory_plan.py``: peak RSS on CPU, the allocator's peak on CUDA).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .batches import auto_chunk_size
from .config import KNOWN_MODELS, ModelShape, apply_overrides
from .export import QD_CHUNK_BLOCKS
from .files import proc_value
from .models import native_bf16

GiB = 1 << 30
MiB = 1 << 20


class PlanError(ValueError):
    """The plan cannot be made as asked (unknown GPU, unknown model shape); the message says what to give."""


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A ModelShape from a ``config.json`` mapping (Llama, Qwen2, Mistral, Gemma and similar)."""
    try:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return ModelShape(name, config["vocab_size"], hidden, config["intermediate_size"],
                          config["num_hidden_layers"], heads, config.get("num_key_value_heads") or heads,
                          config.get("head_dim") or hidden // heads, bool(config.get("tie_word_embeddings", False)),
                          bool(config.get("attention_bias", config.get("model_type") == "qwen2")))
    except KeyError as exc:
        raise PlanError(f"{name}: config.json has no {exc.args[0]!r}; the plan needs a decoder-only transformer "
                        f"config (hidden_size, num_attention_heads, intermediate_size, num_hidden_layers).") from exc


def model_shape(source: str, revision: Optional[str] = None, tiny=None) -> ModelShape:
    """The shape of a teacher/student source: "tiny", "embedded", a known Hub id, a local folder, or a Hub id
    whose config.json is in the local Hub cache. Unknown shapes raise PlanError naming what to give."""
    if source == "tiny":
        t = tiny
        return ModelShape("tiny-llama", t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads,
                          t.num_kv_heads, t.hidden_size // t.num_heads, True)
    for key in (source, source.removesuffix("-Instruct") + "-Instruct"):
        if key in KNOWN_MODELS:
            return KNOWN_MODELS[key] if key == source else dataclasses.replace(KNOWN_MODELS[key], name=source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and "smollm2-135m" in path.name.lower():
        return KNOWN_MODELS["embedded"]
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), source)
    if source.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - any failure means: not in the cache
            cached = None
        if isinstance(cached, str):
            return shape_from_config(json.loads(Path(cached).read_text()), source)
    raise PlanError(f"No shape known for {source!r}: the plan knows {', '.join(k for k in KNOWN_MODELS if '/' in k)}, "
                    f"a local folder with config.json, or a Hub id whose config.json is in the local Hub cache.")


# -- devices ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """A machine to plan for: its accelerator (None for CPU only) and host RAM."""

    name: str
    memory: Optional[int]  # accelerator bytes usable by PyTorch (None: CPU, the host RAM is the device)
    capability: Optional[tuple[int, int]]  # CUDA compute capability
    host: Optional[int]  # host RAM in bytes (None: unknown, not checked)
    tflops: float  # dense 16-bit tensor-core peak (fp32 peak on CPU): the time plan's public figures (--gpu NAME)
    host_note: str = ""

    @property
    def cuda(self) -> bool:
        return self.memory is not None


def _gpu(name, gib, capability, host_gb, tflops, note):
    return Device(name, int(gib * GiB), capability, None if host_gb is None else int(host_gb * 1e9), tflops, note)


# Memory as torch.cuda reports it (total_memory); host RAM of the machine users typically get with that GPU.
GPUS: dict[str, Device] = {
    "t4": _gpu("Tesla T4 (Colab)", 14.57, (7, 5), 12.7, 65, "Colab's 12.7 GB"),
    "l4": _gpu("NVIDIA L4 (Colab)", 22.06, (8, 9), 53.0, 121, "Colab's 53 GB"),
    "a10": _gpu("NVIDIA A10", 22.07, (8, 6), None, 125, "not checked: give --host-gb"),
    "a100-40": _gpu("NVIDIA A100-SXM4-40GB (Colab)", 39.39, (8, 0), 83.5, 312, "Colab's 83.5 GB"),
    "a100-80": _gpu("NVIDIA A100-SXM4-80GB", 79.15, (8, 0), None, 312, "not checked: give --host-gb"),
    "h100": _gpu("NVIDIA H100 80GB HBM3", 79.11, (9, 0), None, 989, "not checked: give --host-gb"),
    "h200": _gpu("NVIDIA H200", 139.8, (9, 0), None, 989, "not checked: give --host-gb"),
}


def host_ram() -> Optional[int]:
    """This machine's total RAM in bytes (Linux), else None."""
    total = proc_value("/proc/meminfo", "MemTotal:")  # in kB
    return int(total.split()[0]) * 1024 if total else None


def this_machine() -> Device:
    """The GPU PyTorch sees (device 0), or the CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cap = (props.major, props.minor)
        return Device(props.name, props.total_memory, cap, host_ram(), 312 if cap >= (8, 0) else 65, "this machine")
    return get_device("cpu")


def get_device(name: Optional[str], host_gb: Optional[float] = None) -> Device:
    """A GPU from `GPUS` by name, "cpu", or None for this machine; `host_gb` overrides the host RAM."""
    if name is None:
        device = this_machine()
    elif name == "cpu":
        device = Device(f"CPU ({os.cpu_count()} cores)", None, None, host_ram(), 0.2, "this machine")
    elif name in GPUS:
        device = GPUS[name]
    else:
        raise PlanError(f"Unknown GPU {name!r}: use one of {', '.join(GPUS)} or cpu.")
    if host_gb is not None:
        device = dataclasses.replace(device, host=int(host_gb * 1e9), host_note=f"{host_gb:g} GB given")
    return device


# -- per-token and per-model byte counts -----------------------------------------------------------------------

CUDA_CONTEXT = int(0.5 * GiB)  # CUDA context + cuBLAS workspaces outside the caching allocator (T4-A100, torch 2.x)
ALLOCATOR_SLACK = 0.05  # fragmentation headroom kept free on the accelerator
HOST_RUNTIME_CPU = int(0.39 * GiB)  # Python + torch + transformers + datasets + reasoning-gym imported (measured, CPU build)
HOST_RUNTIME_CUDA = int(2.5 * GiB)  # the same with the CUDA libraries loaded (estimate; Colab shows 2-3 GB)
# gguf's quantize of an fp32 array: its output and temporaries, at most this share of the array's bytes (measured on a
# 432 MiB array: q8_0 0.54, f16 0.50, q4_1 0.33, q4_0 0.29; q8_0 0.55 on a 128 MiB one)
ENCODE_SHARE = 0.56
# gguf's reader of a GGUF file parsed for its tokenizer: a numpy array per part of each string, per string of the
# vocabulary and the merges (160 MB for SmolLM2's 49,152 tokens and 48,900 merges, tracemalloc); transient
GGUF_STRING_BYTES = 1700


def dtype_bytes(precision: str) -> float:
    return {"fp32": 4, "no": 4, "bf16": 2, "fp16": 2, "8bit": 1, "4bit": 0.5}[precision]


def weight_bytes(shape: ModelShape, precision: str) -> int:
    """Weights (and quantization scales) at a precision. bitsandbytes quantizes the decoder's Linear layers
    only: embeddings, norms and the output layer stay in 16 bits."""
    if precision in ("8bit", "4bit"):
        linear = shape.layers * shape.layer_linear_params
        per = 1 + 4 / 4096 if precision == "8bit" else 0.5 + 4 / 64  # int8 + row scales; nf4 + fp32 absmax/64
        return int(linear * per + (shape.params - linear) * 2)
    return int(shape.params * dtype_bytes(precision))


def optimizer_bytes(shape: ModelShape, optimizer: str) -> int:
    """AdamW: two fp32 states per parameter; bitsandbytes 8-bit AdamW: two uint8 states plus block scales."""
    return shape.params * (8 if optimizer == "adamw" else 2) + (shape.params // 256) * 8 * (optimizer != "adamw")


def train_activation_bytes(shape: ModelShape, compute: float, tokens: int, seq_len: int, checkpointing: bool,
                           flash: bool = True) -> int:
    """Activations the backward pass needs for `tokens` tokens (fp32 residual stream, `compute`-byte matmuls).

    Per token and layer, the tensors autograd keeps: the two norms' inputs (fp32 residual stream, 2 x 4H bytes);
    in the compute dtype the two norms' outputs as the projections' inputs (2H), the attention kernel's q, k, v
    and output (2H + 2 kv), the output projection's input (H), and the MLP's gate, up, SiLU and product (4I).
    PyTorch's SDPA uses a fused kernel for training on CUDA and on CPU, so no (heads x L) scores are kept
    (`flash=False` adds them, for the math path). With gradient checkpointing only each layer's input is kept,
    plus one layer's activations while it is recomputed."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    attn = 0 if flash else 2 * shape.heads * seq_len * compute
    per_layer = 8 * h + compute * (5 * h + 2 * kv + 4 * i) + attn
    per_token = (4 * h * shape.layers + per_layer) if checkpointing else per_layer * shape.layers
    return int(tokens * (per_token + 8 * h))  # + the embedding output and the final norm


def forward_activation_bytes(shape: ModelShape, compute: float, tokens: int, seq_len: int, flash: bool) -> int:
    """Transient memory of a forward pass without gradients: about one layer's working set at a time."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    attn = 0 if flash else 3 * shape.heads * seq_len * compute
    return int(tokens * (8 * h + compute * (3 * h + 2 * kv + 3 * i) + attn))


def loss_buffer_bytes(shape: ModelShape, chunk: int, tokens: int, compute: float, implementation: str,
                      teacher_live: Optional[ModelShape]) -> int:
    """The loss's own memory: chunked, about six fp32 (C, V) buffers (logits, log-softmax, the top-k "rest"
    copy, gradients) plus the fp32 output-layer gradient accumulator and the weight cast to the compute dtype;
    full, the same for all N answer tokens at once. A live teacher adds its (C, V) logits and log-softmax."""
    v = shape.vocab
    n = min(chunk, tokens) if implementation == "chunked" else tokens
    total = 6 * 4 * n * v + int(compute * n * v)
    if implementation == "chunked":
        total += 4 * shape.vocab_rows * shape.hidden + (0 if compute == 4 else int(compute * v * shape.hidden))
    if teacher_live is not None:
        total += 2 * 4 * n * v + tokens * teacher_live.hidden * 4
    return total


def kv_cache_bytes(shape: ModelShape, batch: int, length: int, compute: float) -> int:
    return int(2 * shape.layers * shape.kv_dim * batch * length * compute)


# -- the plan -----------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One stage's peak: what sits on the accelerator and in host RAM at once, item by item."""

    name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    optional: Optional[str] = None  # a stage the run does not reach by itself: what starts it (its overflow is a note)

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())


@dataclass
class MemoryPlan:
    """Stages with their peaks, the verdict, and the knobs that would make a failing plan fit."""

    device: Device
    teacher: ModelShape
    student: ModelShape
    stages: list[Stage]
    settings: dict  # the resolved choices the plan assumed (precisions, chunk, tokens per batch ...)
    fixes: list[str] = field(default_factory=list)  # overrides that would make it fit (when it does not)
    notes: list[str] = field(default_factory=list)

    @property
    def device_limit(self) -> Optional[int]:
        return None if self.device.memory is None else int(self.device.memory * (1 - ALLOCATOR_SLACK))

    def overflows(self, s: Stage) -> list[str]:
        """What of stage `s` overflows: the GPU, the host RAM, or neither."""
        out = []
        if self.device_limit is not None and s.device_peak > self.device_limit:
            out.append(f"{s.name}: {gib(s.device_peak)} on the GPU > {gib(self.device_limit)} usable")
        if self.device.host is not None and s.host_peak > self.device.host:
            out.append(f"{s.name}: {gib(s.host_peak)} of host RAM > {gib(self.device.host)}")
        return out

    def problems(self, optional: bool = False) -> list[str]:
        """What overflows, stage by stage: the stages a run goes through, or (`optional`) those it reaches only
        when asked (healing)."""
        return [p for s in self.stages if bool(s.optional) == optional for p in self.overflows(s)]

    @property
    def fits(self) -> bool:
        return not self.problems()

    @property
    def verdict(self) -> str:
        if self.fits:
            worst = max((s for s in self.stages if not s.optional),
                        key=lambda s: s.device_peak if self.device.cuda else s.host_peak)
            peak = worst.device_peak if self.device.cuda else worst.host_peak
            limit = self.device_limit if self.device.cuda else self.device.host
            room = f" ({100 * peak / limit:.0f}% of {gib(limit)}, at {worst.name})" if limit else ""
            return f"FITS on {self.device.name}: peak {gib(peak)}{room}"
        return f"DOES NOT FIT on {self.device.name}: " + "; ".join(self.problems())

    def __str__(self) -> str:
        s = self.settings
        lines = [f"memory plan: teacher {self.teacher.name} ({self.teacher.params / 1e6:,.0f}M, {s['teacher_precision']}"
                 f"), student {self.student.name} ({self.student.params / 1e6:,.0f}M, fp32 weights, "
                 f"{'fp32' if s['mixed_precision'] == 'no' else s['mixed_precision']} compute), on {self.device.name}",
                 f"  batches: train {s['train_tokens']:,} tokens per micro-batch ({s['lengths']}), loss chunk "
                 f"{s['chunk']} tokens, gradient checkpointing {'on' if s['checkpointing'] else 'off'}, optimizer "
                 f"{s['optimizer']}; eval {s['eval_tokens']:,} tokens per batch"]
        for stage in self.stages:
            for label, items in ([("GPU", stage.device)] if self.device.cuda else []) + [("host", stage.host)]:
                total = sum(items.values())
                parts = ", ".join(f"{k} {gib(v)}" for k, v in items.items() if v)
                lines.append(f"  {stage.name + ('*' if stage.optional else ''):<16} {label:<4} {gib(total):>10} = "
                             f"{parts}")
        host = "" if self.device.host is None else f"{gib(self.device.host)}, "
        lines.append(f"  host RAM: {host}{self.device.host_note or 'not known'}")
        lines += [f"  note: {n}" for n in self.notes]
        for stage in (s for s in self.stages if s.optional):
            over = self.overflows(stage)
            host_over = self.device.host is not None and stage.host_peak > self.device.host
            alone = ALONE.get(stage.name)  # a process of its own helps the host, not the GPU
            advice = f"; {alone}" if host_over and alone else ""
            lines.append(f"  * {stage.name}: only when asked ({stage.optional}); " + (
                f"does not fit: {'; '.join(over)}{advice}" if over else "fits"))
        lines.append(self.verdict)
        knobs = " ".join(f"--set {f}" for f in self.fixes if "=" in f)
        rest = [f for f in self.fixes if "=" not in f]
        if self.fixes and not rest:
            lines.append(f"  would fit with: {knobs}")
        elif rest:
            lines.append(f"  no knob alone makes it fit: {knobs + ', then ' if knobs else ''}" + "; ".join(rest))
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / MiB:.0f} MiB"


def memory_plan(cfg, gpu: Optional[str] = None, *, host_gb: Optional[float] = None,
                lengths: Optional[Sequence[int]] = None, eval_lengths: Optional[Sequence[int]] = None,
                prompt_lengths: Optional[Sequence[int]] = None, suggest: bool = True,
                device: Optional[Device] = None) -> MemoryPlan:
    """The memory plan of `cfg` on `gpu` (a `GPUS` name, "cpu", or None for this machine).

    `lengths` / `eval_lengths` / `prompt_lengths`: token lengths of the tokenized training rows, held-out rows and
    held-out prompts; without them every row is taken at its length limit (the worst case). When the plan does not fit
    and `suggest` is set, the knobs that would make it fit are searched and listed in `fixes`."""
    device = device or get_device(gpu, host_gb)
    lengths = (lengths, eval_lengths, prompt_lengths)
    plan = _plan(cfg, device, *lengths)
    if suggest and not plan.fits:
        plan.fixes = _search_fixes(cfg, device, lengths)
    return plan


def _resolved(cfg, device: Device) -> dict:
    auto_mixed = ("bf16" if native_bf16(device.capability) else "fp16") if device.cuda else "no"
    mixed = auto_mixed if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    teacher = ("8bit" if device.cuda else "fp32") if cfg.teacher.precision == "auto" else cfg.teacher.precision
    return {"mixed_precision": mixed, "teacher_precision": teacher, "compute": dtype_bytes(mixed)}


def _shapes(cfg) -> tuple[ModelShape, ModelShape]:
    teacher = model_shape(cfg.teacher.source, cfg.teacher.revision, cfg.teacher.tiny)
    s = cfg.student
    if s.source == "derive":
        student = teacher.with_layers(len(s.layers) if s.layers else s.num_layers)
    elif s.source == "config":  # the teacher's family with the configured shape (head size kept)
        heads = s.num_heads or teacher.heads
        student = dataclasses.replace(
            teacher, name=f"{teacher.name} family, configured", layers=s.num_layers, hidden=s.hidden_size or
            teacher.hidden, heads=heads, kv_heads=s.num_kv_heads or min(teacher.kv_heads, heads),
            intermediate=s.intermediate_size or teacher.intermediate)
    else:
        student = model_shape(s.source, s.revision)
    return teacher, student


def _kept_states(cfg, teacher: ModelShape, t_bytes: int, eval_lengths, prompt_lengths) -> dict[str, int]:
    """The teacher's final hidden states at every held-out answer position, kept on the host by the evaluation's
    agreement pass (`batches.AnswerHidden`) when it measures agreement: without real lengths, every held-out row at
    eval.max_length taken as answer."""
    if not cfg.eval.agreement:
        return {}
    answers = (sum(eval_lengths) - sum(prompt_lengths) if eval_lengths and prompt_lengths
               else cfg.data.eval_size * cfg.eval.max_length)
    return {"teacher's held-out hidden states": answers * teacher.hidden * t_bytes}


def _plan(cfg, device: Device, lengths, eval_lengths, prompt_lengths) -> MemoryPlan:
    (teacher, student), r = _shapes(cfg), _resolved(cfg, device)
    tr, ev, tc, compute = cfg.train, cfg.eval, cfg.teacher_cache, r["compute"]
    t_bytes = dtype_bytes(r["teacher_precision"]) if r["teacher_precision"] in ("fp32", "bf16", "fp16") else 2
    flash = device.cuda  # inference: SDPA's fused kernels on CUDA; on CPU with a padding mask, the math path
    train_len = max(lengths) if lengths else cfg.data.max_length
    eval_len = max(eval_lengths) if eval_lengths else ev.max_length
    train_tokens = tr.batch_size * train_len
    eval_tokens = ev.batch_size * eval_len
    gen_rows = ev.generate_batch_size or ev.batch_size  # questions per generation batch
    # Only answer tokens reach the output layer; without real lengths every token is taken as one (worst case).
    share = 1 - sum(prompt_lengths) / sum(eval_lengths) if prompt_lengths and eval_lengths else 1.0
    train_answers, eval_answers = int(share * train_tokens), int(share * eval_tokens)
    chunk = cfg.loss.chunk_size or auto_chunk_size(student.vocab, "cuda" if device.cuda else "cpu")
    implementation = "full" if cfg.loss.implementation == "full" else "chunked"
    live = not tc.use or tr.on_policy > 0  # without the cache (or scoring rollouts) the teacher runs in training
    tw, sw = weight_bytes(teacher, r["teacher_precision"]), weight_bytes(student, "fp32")

    def stage(name: str, on_device: dict[str, int], on_host: dict[str, int]) -> Stage:
        if device.cuda:
            return Stage(name, {"CUDA context": CUDA_CONTEXT, **on_device}, {"runtime": HOST_RUNTIME_CUDA, **on_host})
        return Stage(name, {}, {"runtime": HOST_RUNTIME_CPU, **on_host, **on_device})  # one memory: the host's

    # The untrained student lives on the host while it is not evaluated; on CPU everything is in one place.
    resting = {"student (untrained, on host)": sw}
    stages = [stage("teacher cache", {
        "teacher weights": tw,
        "forward activations": forward_activation_bytes(teacher, t_bytes, tc.batch_size * train_len, train_len, flash),
        "logit chunks": 3 * 4 * min(chunk, int(share * tc.batch_size * train_len)) * teacher.vocab}, resting)
              ] if tc.use else []  # without the cache the teacher runs inside training (counted there)
    evaluation = functools.partial(_evaluation_device, tw, sw, forward_activation_bytes(
        teacher if teacher.params > student.params else student, max(t_bytes, 4 if not device.cuda else 2),
        eval_tokens, eval_len, flash), 3 * 4 * min(chunk, eval_answers) * student.vocab)
    stages.append(stage("evaluation", evaluation(1), {}))
    kept = _kept_states(cfg, teacher, t_bytes, eval_lengths, prompt_lengths)  # on the host from here on
    gen_len = (max(prompt_lengths) if prompt_lengths else eval_len) + ev.max_new_tokens
    gen_model = teacher if teacher.params >= student.params else student
    stages.append(stage("generation", {
        "teacher weights": tw, "KV cache": kv_cache_bytes(gen_model, gen_rows, gen_len, max(compute, t_bytes)),
        "step logits": 3 * 4 * gen_rows * gen_model.vocab_rows}, {**resting, **kept}))
    if cfg.data.targets != "reference":
        gb = cfg.generate.batch_size
        stages.append(stage("teacher answers", {
            "teacher weights": tw, "KV cache": kv_cache_bytes(teacher, gb, train_len + cfg.generate.max_new_tokens,
                                                              t_bytes),
            "step logits": 3 * 4 * gb * teacher.vocab_rows}, resting))
    loss_buffers = functools.partial(loss_buffer_bytes, student, chunk, train_answers, compute, implementation)
    train_device = {
        "student weights (fp32)": sw, "gradients": sw, f"optimizer ({tr.optimizer})": optimizer_bytes(student,
                                                                                                      tr.optimizer),
        "activations": train_activation_bytes(student, compute, train_tokens, train_len, tr.gradient_checkpointing),
        "loss buffers": loss_buffers(teacher if live else None)}
    if tr.on_policy > 0:  # the student samples its rollouts with a KV cache, without gradient
        train_device["rollout KV cache"] = kv_cache_bytes(student, tr.batch_size, train_len + tr.rollout_max_new_tokens,
                                                          compute)
    train_host = {**resting, **kept}
    if live:
        train_device["teacher weights"] = tw
    elif device.cuda:
        train_host["teacher (offloaded to host)"] = tw
    else:
        train_host["teacher weights"] = tw
    stages.append(stage("training", train_device, train_host))
    if ev.baseline:  # the same training again, while the distilled student waits on the host
        stages.append(stage("baseline", {k: v for k, v in train_device.items() if k != "teacher weights"},
                            {**train_host, "distilled student (on host)": sw}))
        if ev.agreement:  # one teacher pass scores both trained students: they visit the device together
            stages.append(stage("evaluation after", evaluation(2), {**resting, **kept}))
    stages.append(_export(stage, student, teacher, (train_host, tw, sw), cfg, device.cuda, (train_len, flash)))
    stages.append(_healing(stage, student, train_device, train_host, sw, compute, cfg, device.cuda, loss_buffers(None)))
    _one_memory(stages, tw, sw, device)
    settings = {"teacher_precision": r["teacher_precision"], "mixed_precision": r["mixed_precision"],
                "chunk": chunk, "train_tokens": train_tokens, "eval_tokens": eval_tokens,
                "checkpointing": tr.gradient_checkpointing, "optimizer": tr.optimizer,
                "lengths": (f"longest row {train_len} tokens of {len(lengths)}" if lengths
                            else f"worst case: every row at data.max_length={cfg.data.max_length}")}
    emulated = device.cuda and r["mixed_precision"] == "bf16" and (device.capability or (0, 0)) < (8, 0)
    notes = ["bf16 is emulated on this GPU (no bf16 tensor cores): use fp16 or auto"] if emulated else []
    return MemoryPlan(device, teacher, student, stages, settings, notes=notes)


HEAL_ALONE = ("heal in a process of its own, whose host holds neither the baseline nor the held-out states: python "
              "-m pocket_teacher export --run runs/NAME --quant TYPE --heal-steps N")
EXPORT_ALONE = ("export in a process of its own, whose host holds the teacher only while the run's rows are rebuilt, "
                "then the student alone: python -m pocket_teacher export --run runs/NAME --quant TYPE")
ALONE = {"healing": HEAL_ALONE, "export": EXPORT_ALONE}


def healing_bytes(student: ModelShape, compute: float, checkpointing: bool) -> dict[str, int]:
    """What healing (`Experiment.heal`: training with every matrix rounded as the file will hold it) holds beyond
    a training step. The output layer, rounded in fp32 for each micro-batch, is held while the chunked loss runs
    (the loss's peak); each decoder matrix, rounded in fp32 when its layer runs, is kept for backward as it is
    multiplied (fp32 on CPU; in the compute dtype under autocast, after a transient fp32 copy of one layer), for
    every layer or, with gradient checkpointing, for the one being recomputed; `export.quantize_dequantize` rounds
    `QD_CHUNK_BLOCKS` blocks at a time (about six fp32 temporaries of that size). Healing an equalized file (the
    default for q8_0 / q4_0 / q4_1) first multiplies each matrix by its scales in fp32, by columns then by rows:
    two fp32 copies of the largest matrix (the MLP's) for a moment; autograd keeps only the scale vectors."""
    layer = student.layer_linear_params
    kept = (1 if checkpointing else student.layers) * layer * (4 if compute == 4 else compute)
    return {"rounded output layer (fp32)": 4 * student.vocab_rows * student.hidden,
            "rounded layer matrices": int(kept + (0 if compute == 4 else 4 * layer)),
            "rounding temporaries": 6 * 4 * 32 * QD_CHUNK_BLOCKS,
            "equalization temporaries": 2 * 4 * student.hidden * student.intermediate}


def _healing(stage, student: ModelShape, train_device: dict, train_host: dict, student_bytes: int, compute: float,
             cfg, cuda: bool, cached_loss: int) -> Stage:
    """Healing after the run, in the same process (the notebook's `exp.heal`): training's one copy of the distilled
    student, trained as in the training stage plus `healing_bytes`, while the distilled student (and the baseline)
    wait on the host; on a GPU the copy is made on the host, and the healed student comes back there. Healing
    takes no on-policy steps: with the teacher cache (`cached_loss`: the loss's buffers without a live teacher) the
    teacher waits on the host even where the run's on-policy steps had it on the device.
    `python -m pocket_teacher export --heal-steps` holds less: no baseline."""
    device = {("healing copy of the student (fp32)" if k.startswith("student weights") else k): v
              for k, v in train_device.items() if k != "rollout KV cache"}
    host = {**train_host, "distilled student (on host)": student_bytes}
    if cfg.teacher_cache.use and "teacher weights" in device:
        host["teacher (offloaded to host)" if cuda else "teacher weights"] = device.pop("teacher weights")
        device["loss buffers"] = cached_loss
    if cfg.eval.baseline:
        host["baseline student (on host)"] = student_bytes
    if cuda:
        host["healing copy, then the healed student (on host)"] = student_bytes
    healing = stage("healing", {**device, **healing_bytes(student, compute, cfg.train.gradient_checkpointing)}, host)
    healing.optional = "exp.heal / export --heal-steps"
    return healing


def export_bytes(student: ModelShape, teacher: ModelShape, row: tuple[int, bool], gguf_teacher: bool
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """What `Experiment.export` (a q8_0 / q4_0 / q4_1 file, equalized: the most of the types) holds beyond the models
    at rest, (on the device, on the host). On the device, the equalization's calibration: training rows (`row`: the
    longest's tokens, and whether attention is fused) run one at a time without gradients, the student's fp32 output
    for the row, and the magnitudes of the two MLP input matrices whose column maxima set the scales. On the host,
    one after the other: the teacher's GGUF file parsed for its tokenizer, when the teacher is one (gguf's reader,
    `GGUF_STRING_BYTES` per string of the vocabulary and about as many merges), then the tensor being written
    (`export.export_gguf` writes a tensor at a time): the largest of the embedding (read in place) with its
    encoding, and an MLP matrix, folded with its scales in two fp32 steps."""
    tokens, flash = row
    mlp = 4 * student.hidden * student.intermediate
    device = {"calibration row (forward, fp32 output)": forward_activation_bytes(student, 4, tokens, tokens, flash)
              + 4 * tokens * student.vocab_rows, "weight magnitudes (two MLP matrices)": 2 * mlp}
    writing = max(int(ENCODE_SHARE * 4 * student.vocab_rows * student.hidden), 2 * mlp)
    parse = GGUF_STRING_BYTES * 2 * teacher.vocab if gguf_teacher else 0
    label = "the teacher's GGUF parsed, then the tensor being written" if parse else "the tensor being written"
    return device, {label: max(writing, parse)}


def _export(stage, student: ModelShape, teacher: ModelShape, resting: tuple[dict, int, int], cfg, cuda: bool,
            row: tuple[int, bool]) -> Stage:
    """The run's student written as a GGUF file in the run's process after the run (`exp.export`, the notebook's
    "Ship it" cell; `run` does not export): it visits the device for the equalization and is written from the
    host, while the baseline and the rest wait there as after the run. Outside training the teacher is on the
    device (training parks it on the host only while it trains). `resting` is (training's host items, the
    teacher's bytes, the student's). `python -m pocket_teacher export` holds less: the teacher and the untrained
    student while it rebuilds the run's calibration rows, freed before the trained student is loaded."""
    train_host, teacher_bytes, student_bytes = resting
    source = str(cfg.teacher.source)
    device, host = export_bytes(student, teacher, row, source == "embedded" or source.endswith(".gguf"))
    waiting = {**{k: v for k, v in train_host.items() if k != "teacher (offloaded to host)"},
               "distilled student (on host)": student_bytes}
    if cfg.eval.baseline:
        waiting["baseline student (on host)"] = student_bytes
    if not cuda:  # one memory, the teacher's weights in it: the calibration is over before the writing begins
        export = stage("export", {}, {**waiting, "calibration, GGUF parse or one tensor (the largest)": max(
            sum(device.values()), *host.values())})
    else:
        export = stage("export", {"teacher weights": teacher_bytes, "student weights (fp32)": student_bytes,
                                  **device}, {**waiting, **host})
    export.optional = "exp.export, the notebook's Ship it cell"
    return export


def _evaluation_device(teacher_bytes: int, student_bytes: int, activations: int, logit_chunk: int,
                       students: int) -> dict[str, int]:
    """An evaluation's device: the teacher, one student (or the distilled student and the baseline, scored in one
    teacher pass), the larger model's forward activations, and each model's logit chunks."""
    names = ["student weights"] if students == 1 else ["distilled student weights", "baseline weights"]
    return {"teacher weights": teacher_bytes, **dict.fromkeys(names, student_bytes),
            "forward activations": activations,
            f"logit chunks ({'both' if students == 1 else 'three'} models)": (students + 1) * logit_chunk}


def _one_memory(stages: list[Stage], teacher_bytes: int, student_bytes: int, device: Device) -> None:
    """On CPU the teacher stays in RAM in every stage, and the evaluated student is the one resting there:
    count each once per stage (on a GPU, nothing to do)."""
    for s in stages if not device.cuda else []:
        s.host.setdefault("teacher weights", teacher_bytes)
        if s.name == "evaluation":
            s.host.pop("student weights", None)
            s.host["student (untrained, on host)"] = student_bytes


def _search_fixes(cfg, device: Device, lengths: tuple) -> list[str]:
    """What would make `cfg` fit: knobs tried in order, each kept once it helps (speed traded for memory, cheapest
    first), then the student size that fits beside the rest."""
    tr = cfg.train
    steps = []
    if not tr.gradient_checkpointing:
        steps.append(["train.gradient_checkpointing=true"])
    if tr.optimizer == "adamw":
        steps.append(["train.optimizer=adamw_8bit"])
    if not cfg.teacher_cache.use:
        steps.append(["teacher_cache.use=true"])
    if device.cuda and cfg.teacher.precision in ("auto", "fp32", "bf16", "fp16"):
        steps.append(["teacher.precision=8bit"])
    if device.cuda:
        steps.append(["teacher.precision=4bit"])
    b = tr.batch_size
    while b > 1:
        b //= 2
        steps.append([f"train.batch_size={b}", f"train.grad_accum={tr.grad_accum * tr.batch_size // b}",
                      f"eval.batch_size={max(1, cfg.eval.batch_size * b // tr.batch_size)}",
                      f"teacher_cache.batch_size={max(1, cfg.teacher_cache.batch_size * b // tr.batch_size)}"])
    chosen: list[str] = []
    current = _plan(cfg, device, *lengths)
    for step in steps:
        after = _plan(apply_overrides(cfg, chosen + step), device, *lengths)
        if _overflow(after) < _overflow(current):
            chosen = [c for c in chosen if c.split("=")[0] not in {s.split("=")[0] for s in step}] + step
            current = after
            if after.fits:
                return chosen
    training = next(s for s in current.stages if s.name == "training")
    limit = current.device_limit if device.cuda else device.host
    optimizer = next((c.split("=")[1] for c in chosen if c.startswith("train.optimizer=")), tr.optimizer)
    per_param = 4 + 4 + (8 if optimizer == "adamw" else 2)  # fp32 weights, gradients, optimizer states
    fixed = (training.device_peak if device.cuda else training.host_peak) - per_param * current.student.params
    room = max(0, (limit or 0) - fixed) // max(1, per_param)
    return chosen + [f"a smaller student: about {room / 1e6:,.0f}M parameters or fewer fit beside the rest"]


def _overflow(plan: MemoryPlan) -> int:
    """Bytes by which the stages overflow the accelerator and the host RAM, summed."""
    limits = [(plan.device_limit, "device_peak"), (plan.device.host, "host_peak")]
    return sum(max(0, getattr(s, peak) - limit) for s in plan.stages if not s.optional
               for limit, peak in limits if limit is not None)


def inference_bytes_per_token(model) -> int:
    """Transient bytes per token of a no-gradient forward of a loaded model (sizes evaluation batches)."""
    shape = shape_from_config(model.config.to_dict(), type(model).__name__)
    compute = max(2, next(model.parameters()).element_size())
    return forward_activation_bytes(shape, compute, 1, 1, True)
