"""Ship it: a student as one GGUF file that llama.cpp (and Ollama, LM Studio) load, written with the `gguf`
package's own writer in pure Python (no llama.cpp build), and read back through transformers.

    report = export_gguf(student, tokenizer, "runs/pocket/student-q8_0.gguf", quant="q8_0",
                         tokenizer_gguf=embedded_gguf_path())   # tokenizer copied from the teacher's file
    model, tok = load_gguf("runs/pocket/student-q8_0.gguf")     # dequantized, through transformers

- Architectures: the Llama family (SmolLM2, its derived, pruned and config students) and Qwen2, with their metadata
  as llama.cpp reads it (head size written explicitly, so pruned shapes whose heads are not hidden / heads load).
  Llama's query and key rows are permuted the way llama.cpp's converter does (transformers undoes it on reading).
- Types: f32, f16, q8_0, q4_0, q4_1 (the GGUF block rules of `gguf.quants`). Norms and biases stay f32, as
  llama.cpp's converter keeps them; a matrix whose rows are not a multiple of the block size falls back to f16 and
  the report names it. `fake_quantize` gives the student the exact weights a file holds, for checks and healing.
- The tokenizer: copied field by field from a GGUF that holds the same vocabulary (the embedded teacher's), or
  built from a Hugging Face BPE tokenizer (vocabulary, merges, token types, special tokens, chat template).
- Activation equalization (`equalization`, `Equalization`): per-channel scales folded into the norms and the
  matrices that read them, measured on a few training rows; the same function, whose activations llama.cpp's 8-bit
  rounding then changes less. `Experiment.export`, the CLI (`experiment.export_from_run`) and `export_run` given
  calibration rows apply it to q8_0, q4_0 and q4_1 files.
- The file is written beside its place and renamed in when whole, after a free-space check: a failure leaves no
  partial file. The header and tensor table come from the shapes; then each tensor is read, encoded and written
  before the next, so an export holds one tensor, not the encoded file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.nn.utils import parametrize

from . import llamacpp
from .checkpoints import newest_valid
from .files import replacing, require_free_space
from .models import ModelLoadError, embedded_gguf_path, gguf_dense

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF general.architecture
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


class ExportError(ValueError):
    """A model, a type or a file that cannot be exported; the message names what and the fix."""


def _gguf():
    import gguf  # a run-time requirement (the embedded teacher is read through it)

    return gguf


def _qtype(quant: str):
    if quant not in QUANTS:
        raise ExportError(f"Unknown GGUF type {quant!r}: use one of {', '.join(QUANTS)} (q8_0 keeps quality; q4_0 "
                          f"and q4_1 are about half its size).")
    q = _gguf().GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0, "q4_1": q.Q4_1}[quant]


@dataclass
class ExportReport:
    path: Path
    quant: str
    bytes: int
    tensors: int
    parameters: int
    tokenizer: str
    fallbacks: list = field(default_factory=list)  # [(tensor, type used, why)]
    equalized: str = ""  # how the activations were evened out (`Equalization`), or "" when they were not
    embedding: str = ""  # the embedding's (and output layer's) own type, or "" when it is the file's

    def __str__(self) -> str:
        line = (f"GGUF {self.quant}: {self.path} ({self.bytes / 2**20:,.1f} MiB, {self.tensors} tensors, "
                f"{self.parameters / 1e6:.1f}M parameters); tokenizer {self.tokenizer}")
        if self.fallbacks:
            line += "; kept in another type: " + ", ".join(f"{n} as {t} ({why})" for n, t, why in self.fallbacks)
        if self.embedding:
            line += f"; embedding and output layer in {self.embedding}"
        if self.equalized:
            line += f"; {self.equalized}"
        return line


def gguf_file_name(model: str, quant: str, embedding: Optional[str] = None) -> str:
    """An export's default file name: <model>-<quant>.gguf, or <model>-<quant>-embedding-<type>.gguf when the
    embedding takes another type (never the name of the file written without it)."""
    kept = f"-embedding-{embedding}" if embedding and embedding != quant else ""
    return f"{model}-{quant}{kept}.gguf"


# the embedding and the output layer (one tensor when tied), under GGUF's and transformers' names
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight", "model.embed_tokens.weight", "lm_head.weight")


def tensor_quant(name: str, quant: str, embedding: Optional[str] = None) -> str:
    """The type tensor `name` (a GGUF or transformers name) is written in: `embedding` for the embedding and the
    output layer when given, else the file's `quant`. For a tied embedding (the output layer) this is what
    llama.cpp's quantizer does by default in its 4-bit files (Q6_K, or Q8_0); of an untied model it raises only the
    output layer, where this raises the input embedding too."""
    if embedding is None:
        return quant
    _qtype(embedding)
    return embedding if name in EMBEDDING_TENSORS else quant


# -------------------------------------------------------------------------------------------------- the shapes
def check_exportable(config) -> None:
    """Refuse, with the fix, a model llama.cpp cannot run from what this writer knows."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ExportError(f"GGUF export writes the Llama family (SmolLM2 and its students) and Qwen2; this model is "
                          f"{kind!r}. Convert it with llama.cpp's convert_hf_to_gguf.py instead.")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    convert = "convert the saved student folder with llama.cpp's convert_hf_to_gguf.py instead"
    problems = []
    if heads % kv:
        problems.append(f"{heads} query heads are not a multiple of {kv} key/value heads (choose student.num_heads "
                        f"a multiple of student.num_kv_heads)")
    if head_dim % 2:
        problems.append(f"head size {head_dim} is odd: rotary embeddings pair dimensions, llama.cpp cannot run it "
                        f"(build a config student whose student.hidden_size / student.num_heads is even)")
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope} is not written by this exporter ({convert})")
    if kind == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append(f"a Llama with attention or MLP biases is not written by this exporter ({convert})")
    if problems:
        raise ExportError("llama.cpp cannot run this model as exported: " + "; ".join(problems) + ".")


def _rope(config) -> dict:
    """The rotary settings (transformers 5 keeps them in rope_parameters / rope_scaling, with rope_theta)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a Llama query or key projection's rows (transformers' GGUF reader undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def gguf_name(name: str) -> Optional[str]:
    """The GGUF tensor name (llama.cpp's) of a Llama / Qwen2 parameter, e.g. model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight; None for a parameter the format does not know."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in _LAYER:
        return None
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}"


def gguf_tensors(model: torch.nn.Module, equalized: Optional["Equalization"] = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every tensor of a Llama / Qwen2 causal LM, the output layer left out when tied
    to the embeddings, one at a time: a model on a GPU comes to the host a tensor at a time, and `export_gguf`
    encodes and writes each before it reads the next, so an export holds one fp32 tensor and its encoding, not a
    second model or the whole file. A parameter this mapping does not know is an error raised here, before any
    tensor is read, never dropped. With `equalized`, its scales are folded into each tensor as it is read
    (`Equalization.apply`)."""
    return _arrays(_written(model, equalized), model.config, equalized)


def _written(model: torch.nn.Module, equalized: Optional["Equalization"]) -> dict[str, torch.Tensor]:
    """The parameters a file holds, in order (transformers name -> tensor, no value read): the model's, less a
    tied output layer; refused first when one has no GGUF name or `equalized` was measured on another depth."""
    config = model.config
    check_exportable(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {name: t for name, t in model.state_dict().items() if not (name == "lm_head.weight" and tied)}
    unknown = [name for name in state if gguf_name(name) is None]
    if unknown:
        raise ExportError(f"GGUF export does not know these parameters: {', '.join(unknown[:5])}"
                          + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
                          + ". Only Llama / Qwen2 causal LMs are written.")
    if equalized is not None:
        equalized.check(config)
    return state


def _arrays(state: dict, config, equalized) -> Iterator[tuple[str, np.ndarray]]:
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for name, tensor in state.items():
        if equalized is not None:
            tensor = equalized.apply(name, tensor, config)
        target, array = gguf_name(name), tensor.detach().to(torch.float32).cpu().numpy()
        if config.model_type == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            array = _permute(array, heads if target.endswith("attn_q.weight") else kv)
        yield target, array


def _layout(name: str, shape: tuple, quant: str) -> tuple[object, np.dtype, int, Optional[tuple]]:
    """How one tensor of `shape` is written under the asked type, before any value is read: (raw GGML type or
    None, numpy dtype of the values written, bytes written, fallback or None)."""
    gguf = _gguf()
    count = int(np.prod(shape))
    if len(shape) < 2 or quant == "f32":
        return None, np.dtype(np.float32), 4 * count, None
    if quant == "f16":
        return None, np.dtype(np.float16), 2 * count, None
    qtype = _qtype(quant)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        why = f"rows of {shape[-1]} values are not a multiple of {quant}'s block of {block}"
        return None, np.dtype(np.float16), 2 * count, (name, "f16", why)
    return qtype, np.dtype(np.float32), count // block * size, None


def _encode(name: str, array: np.ndarray, quant: str) -> tuple[np.ndarray, object, Optional[tuple]]:
    """(data to write, raw GGML type or None, fallback or None) for one tensor under the asked type."""
    raw, dtype, _, fallback = _layout(name, array.shape, quant)
    data = np.ascontiguousarray(array, dtype=dtype)
    return (data if raw is None else _gguf().quants.quantize(data, raw)), raw, fallback


def fake_quantize(model: torch.nn.Module, quant: str, embedding: Optional[str] = None) -> torch.nn.Module:
    """A copy of `model` whose weights are exactly what a `quant` file holds once read back (quantized, then
    dequantized with the GGUF block rules; the same f16 fallback; the embedding in `embedding` when given): the
    reference for the round trip."""
    _qtype(quant)
    gguf = _gguf()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            array = param.detach().to(torch.float32).cpu().numpy()
            data, raw, fallback = _encode(name, array, tensor_quant(name, quant, embedding))
            if raw is not None:
                back = gguf.quants.dequantize(data, raw)
            else:
                back = data.astype(np.float32)
            param.copy_(torch.from_numpy(np.ascontiguousarray(back).reshape(array.shape)).to(param.dtype))
    return twin


# --------------------------------------------------------------------------------------- activation equalization
EQUALIZE_ALPHA = 0.5  # SmoothQuant's migration strength: the difficulty shared evenly by activations and weights
EQUALIZE_ROWS = 32  # training rows whose activations set the scales
EQUALIZE_QUANTS = ("q8_0", "q4_0", "q4_1")  # the types llama.cpp multiplies by 8-bit activation blocks
_SCALE_RANGE = (1 / 64, 64.0)  # keeps the fp16 value cache and the norms' f32 far from their limits


@dataclass
class Equalization:
    """Per-channel scales folded into a Llama / Qwen2 model's weights so that each matrix meets activations of
    even size (SmoothQuant, Xiao et al. 2023, at the four places where a scale can move without changing the
    function): a norm's weight divided by `s` and the columns of the matrices that read it multiplied by `s`
    ("attn": the input norm -> q, k, v; "mlp": the post-attention norm -> gate, up); the value projection's rows
    divided by `s` and the output projection's columns multiplied by it ("v", one scale per key/value channel, shared
    by the query heads that read it); the up projection's rows divided and the down projection's columns
    multiplied ("down"). In exact arithmetic the model computes the same function; what changes is what rounding
    meets. llama.cpp rounds the activations to blocks of 32 of 8 bits before every quantized matmul: a block with
    one large channel rounds the others coarsely. With s = max|x|^alpha / max|w|^(1 - alpha) per channel, the large
    activation channels shrink and the matching weight columns grow. `layers[i]` maps those four names to fp32
    scales (kept within `_SCALE_RANGE`); `str()` says how they were measured."""
    alpha: float
    rows: int
    tokens: int
    layers: list

    def __str__(self) -> str:
        return (f"activations equalized (alpha {self.alpha:g}, scales from {self.rows} training rows, "
                f"{self.tokens:,} tokens)")

    def check(self, config) -> None:
        """Refuse a model of another depth than the one these scales were measured on."""
        if len(self.layers) != config.num_hidden_layers:
            raise ExportError(f"the equalization holds scales for {len(self.layers)} layers, the model has "
                              f"{config.num_hidden_layers}: measure it on this model (`equalization(model, rows)`).")

    def apply(self, name: str, tensor: torch.Tensor, config) -> torch.Tensor:
        """A parameter of the model (its transformers name) with the scales folded in; others unchanged."""
        factors = self.factors(name, config)
        return tensor if factors is None else _folded(tensor.detach().to(torch.float32), *factors)

    def factors(self, name: str, config) -> Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """What folding multiplies the parameter `name` by: (one factor per row or None, one per column, or per
        entry of a vector, or None), fp32 on the host; None for a parameter the scales leave alone."""
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            return None
        scales, fold = self.layers[int(parts[2])], _FOLDS.get(".".join(parts[3:]))
        if fold is None:
            return None
        rows = columns = None
        for which, axis, power in fold:
            s = scales[which].to(torch.float32)
            if which == "v" and axis == 1:  # the output projection reads every query head; kv head j serves g heads
                heads, kv = config.num_attention_heads, s.numel() // _head_dim(config)
                s = s.reshape(kv, 1, -1).expand(kv, heads // kv, -1).reshape(-1)
            s = s.pow(power)
            if axis == 0 and name.endswith(".weight"):  # a matrix's rows (every axis-0 fold is on a matrix or bias)
                rows = s if rows is None else rows * s
            else:
                columns = s if columns is None else columns * s
        return rows, columns


def _folded(weight: torch.Tensor, rows: Optional[torch.Tensor], columns: Optional[torch.Tensor]) -> torch.Tensor:
    """An fp32 `weight` multiplied by its factors: columns (or a vector's entries) first, then rows, always in this
    order, so that the export and the healing forward pass (`StraightThrough`) give the same bits; by vectors, so
    no full-size factor is made (nor kept by autograd for the backward pass)."""
    if columns is not None:
        weight = weight * columns.to(weight.device)
    if rows is not None:
        weight = weight * rows.to(weight.device).reshape(-1, 1)
    return weight


# parameter -> [(scale, axis it runs along (0 rows / 1 columns or a vector), power)]. No MLP or output-projection
# bias is listed: `check_exportable` refuses a Llama with them, and Qwen2 has none (its q, k, v biases are here or
# untouched: only v's output is scaled).
_FOLDS = {
    "input_layernorm.weight": [("attn", 1, -1)],
    "self_attn.q_proj.weight": [("attn", 1, 1)],
    "self_attn.k_proj.weight": [("attn", 1, 1)],
    "self_attn.v_proj.weight": [("attn", 1, 1), ("v", 0, -1)],
    "self_attn.v_proj.bias": [("v", 0, -1)],
    "self_attn.o_proj.weight": [("v", 1, 1)],
    "post_attention_layernorm.weight": [("mlp", 1, -1)],
    "mlp.gate_proj.weight": [("mlp", 1, 1)],
    "mlp.up_proj.weight": [("mlp", 1, 1), ("down", 0, -1)],
    "mlp.down_proj.weight": [("down", 1, 1)],
}
# the matrices whose inputs each scale evens out (the first one's input is measured; they all read the same)
_READERS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp": ("mlp.gate_proj", "mlp.up_proj"), "v": ("self_attn.o_proj",), "down": ("mlp.down_proj",)}


@torch.no_grad()
def equalization(model: torch.nn.Module, rows: list, alpha: float = EQUALIZE_ALPHA) -> Equalization:
    """The scales of `Equalization` for `model` (a Llama / Qwen2 causal LM, on any device), from the largest
    magnitude each linear layer's input channel reaches over `rows` (lists of token ids, run one at a time, so
    no padding enters the maxima)."""
    check_exportable(model.config)
    if not 0 <= alpha <= 1:
        raise ExportError(f"equalization alpha {alpha}: use a value from 0 (scales from the weights alone) to 1 "
                          f"(from the activations alone); {EQUALIZE_ALPHA} is the default.")
    rows = [list(map(int, r)) for r in rows if len(r)]
    if not rows:
        raise ExportError("equalization needs calibration rows (token ids); none were given. Export without it "
                          "(--no-equalize) or give the run's training rows.")
    layers = model.model.layers
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            seen[name] = torch.maximum(seen[name], x) if name in seen else x
        return hook

    watched = {f"{i}.{which}": layer.get_submodule(readers[0])
               for i, layer in enumerate(layers) for which, readers in _READERS.items()}
    handles = [module.register_forward_pre_hook(record(key)) for key, module in watched.items()]
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        for ids in rows:
            model(torch.tensor([ids], device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    scales, head = [], _head_dim(model.config)
    for i, layer in enumerate(layers):
        found = {}
        for which, readers in _READERS.items():
            weights = [layer.get_submodule(r).weight.detach().abs().float() for r in readers]
            w = torch.stack([m.amax(0) for m in weights]).amax(0)
            a = seen[f"{i}.{which}"]
            if which == "v":  # one scale per key/value channel: the largest over the query heads that read it
                kv = layer.self_attn.v_proj.weight.shape[0] // head
                a, w = (t.reshape(kv, -1, head).amax(1).reshape(-1) for t in (a, w))
            found[which] = _scale(a, w, alpha)
        scales.append(found)
    return Equalization(alpha, len(rows), sum(map(len, rows)), scales)


def _scale(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    return torch.nan_to_num(s, nan=1.0).clamp(*_SCALE_RANGE).cpu()


# ------------------------------------------------------------------------------------------- quantization-aware
QD_CHUNK_BLOCKS = 1 << 16  # blocks of 32 per pass of `quantize_dequantize`: 8 MiB per fp32 temporary


def quantize_dequantize(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """`weight` as a `quant` GGUF file holds it once read back, computed in torch (on any device): the block
    arithmetic of `gguf.quants` step for step (scales from fp32, stored as fp16; q8_0 rounds half away from zero,
    q4_0 / q4_1 truncate after +8.5 / +0.5), the same f16 fallback for rows that are not a multiple of the block,
    vectors (norms, biases) kept in f32. Equal to `fake_quantize`'s numpy reference bit for bit
    (tests/test_export.py). The blocks are rounded `QD_CHUNK_BLOCKS` at a time into one fp32 result, so the
    temporaries stay a few MiB whatever the matrix (a Qwen2.5 output layer is 0.5 GB in fp32, and each of the
    half-dozen temporaries of a whole-matrix pass would be as large). No gradient: see `StraightThrough`."""
    _qtype(quant)
    w = weight.detach().to(torch.float32)
    if w.ndim < 2 or quant == "f32":
        return w
    if quant == "f16" or w.shape[-1] % 32:  # q8_0, q4_0 and q4_1 all have blocks of 32
        return w.to(torch.float16).to(torch.float32)
    blocks = w.reshape(-1, 32)
    out = torch.empty_like(blocks)
    for start in range(0, blocks.shape[0], QD_CHUNK_BLOCKS):  # `w` is detached: no graph is built
        part = slice(start, start + QD_CHUNK_BLOCKS)
        out[part] = _round_blocks(blocks[part], quant)
    return out.reshape(w.shape)


def _round_blocks(blocks: torch.Tensor, quant: str) -> torch.Tensor:
    """(n, 32) fp32 blocks as a `quant` file holds them once read back."""

    def inverse(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))

    def half(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float16).to(torch.float32)

    if quant == "q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        x = blocks * inverse(d)
        return torch.sign(x) * torch.floor(x.abs() + 0.5) * half(d)
    if quant == "q4_0":
        largest = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True))
        d = largest / -8
        return (torch.trunc(blocks * inverse(d) + 8.5).clamp(0, 15) - 8) * half(d)
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)  # q4_1
    d = (high - low) / 15
    return half(d) * torch.trunc((blocks - low) * inverse(d) + 0.5).clamp(0, 15) + half(low)


class _RoundThrough(torch.autograd.Function):
    """Forward: the weight exactly as the file holds it (for an fp32 weight; a 16-bit one gets those values in its
    own dtype); backward: the gradient passed to the full-precision weight unchanged (the straight-through
    estimator). Exact where `w + (q - w).detach()` is not (fp32 rounding), and without that form's two full-size
    temporaries."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quant: str) -> torch.Tensor:
        return quantize_dequantize(weight, quant).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class StraightThrough(torch.nn.Module):
    """A parametrization: the forward pass sees the weight as the `quant` file will hold it, the gradient flows to
    the full-precision weight as if nothing had been rounded (the straight-through estimator). With `rows` /
    `columns` (an `Equalization`'s factors, kept as buffers so they follow the model's device and copies), the
    weight is scaled by them first, as the export folds them, and then rounded: the latent weight stays as
    trained, the forward pass computes the equalized file. A vector (a norm, a bias) is only scaled."""

    def __init__(self, quant: str, rows: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None):
        super().__init__()
        _qtype(quant)
        self.quant = quant
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("columns", columns, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.rows is None and self.columns is None:
            return _RoundThrough.apply(weight, self.quant) if weight.ndim == 2 else weight
        scaled = _folded(weight.to(torch.float32), self.rows, self.columns)  # in fp32, as the export folds them
        return (_RoundThrough.apply(scaled, self.quant) if weight.ndim == 2 else scaled).to(weight.dtype)


def attach_fake_quant(model: torch.nn.Module, quant: str, equalized: Optional[Equalization] = None
                      ) -> torch.nn.Module:
    """Make every matrix of `model` (the ones a GGUF file quantizes: projections, embeddings, output layer) pass
    through `StraightThrough(quant)` in the forward pass; a tied output layer shares its embedding's latent weight.
    With `equalized` (measured on this model), its scales are folded in first, into the norms and the value bias
    as well: the forward pass is the equalized `quant` file's (healing then fits the weights that file rounds).
    Undo with `detach_fake_quant`. Returns `model`."""
    _qtype(quant)
    if equalized is not None:
        equalized.check(model.config)
    for prefix, module in list(model.named_modules()):
        for kind in ("weight", "bias"):
            tensor = module._parameters.get(kind) if not parametrize.is_parametrized(module, kind) else None
            if not isinstance(tensor, torch.nn.Parameter):
                continue
            factors = equalized.factors(f"{prefix}.{kind}", model.config) if equalized is not None else None
            if factors is not None or (kind == "weight" and tensor.ndim == 2):
                rows, columns = factors or (None, None)
                device = tensor.device
                parametrize.register_parametrization(module, kind, StraightThrough(
                    quant, rows.to(device) if rows is not None else None,
                    columns.to(device) if columns is not None else None), unsafe=True)
    return model


def detach_fake_quant(model: torch.nn.Module) -> torch.nn.Module:
    """Remove `attach_fake_quant`'s parametrizations, keeping the full-precision (latent) weights that training
    updated: exporting them (with the same equalization, where one was attached) writes exactly the weights the
    quantization-aware forward pass used.

    Done by hand rather than with `parametrize.remove_parametrizations`, which deletes the `weight` property from
    the module's class: a deep copy of a parametrized model shares that class (torch copies the instance, not the
    class), so removing the original's broke the copy's (healing trains such a copy). Here the module only goes
    back to its own class, and a tied output layer gets the same latent Parameter as its embedding."""
    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        kinds = set(module.parametrizations)
        if not kinds <= {"weight", "bias"} or not all(
                len(module.parametrizations[k]) == 1 and isinstance(module.parametrizations[k][0], StraightThrough)
                for k in kinds):
            raise ExportError(f"{type(module).__name__} has parametrizations other than attach_fake_quant's "
                              f"({', '.join(module.parametrizations)}); remove them first.")
        originals = {k: module.parametrizations[k].original for k in kinds}
        order = ["weight", "bias", *module._parameters]
        del module.parametrizations
        module.__class__ = type(module).__bases__[0]
        kept = {**module._parameters, **originals}
        module._parameters = {k: kept[k] for k in dict.fromkeys(order) if k in kept}  # as the module registered
    return model


@contextlib.contextmanager
def fake_quantized(model: torch.nn.Module, quant: str, equalized: Optional[Equalization] = None):
    """Inside this block `model` computes with its weights as a `quant` file holds them (each matrix rounded when a
    layer reads it, `quantize_dequantize`; with `equalized`, as the equalized file holds them), on whatever device
    it is; on leaving, the full-precision weights are as before. What `fake_quantize` gives, without its copy of the
    model: scoring a file's weights then costs one matrix at a time, not a second model in host RAM. Refuses a
    model already fake-quantized (`attach_fake_quant`)."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ExportError("fake_quantized: this model already has parametrized weights (attach_fake_quant?); "
                          "detach_fake_quant first.")
    attach_fake_quant(model, quant, equalized)
    try:
        yield model
    finally:
        detach_fake_quant(model)


# ------------------------------------------------------------------------------------------------ the tokenizer
@dataclass(frozen=True)
class _Summary:
    """What this module reads of a GGUF file: each field's contents and value types, each tensor's type name."""
    fields: dict  # name -> (contents, [GGUFValueType, ...])
    tensors: dict  # name -> type name (F32, Q4_0 ...)


@functools.lru_cache(maxsize=2)
def _summary(path: str, stamp: tuple) -> _Summary:
    """A GGUF file parsed once per file version (`stamp`): a 49k-token vocabulary takes seconds. Only the contents
    are kept: gguf's reader makes a numpy array for each part of each string (about 160 MB for the teacher's
    vocabulary and merges, seen here), freed once the contents are read out (about a tenth of that)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    fields = {name: (f.contents(), [gguf.GGUFValueType(t) for t in f.types]) for name, f in reader.fields.items()}
    return _Summary(fields, {t.name: t.tensor_type.name for t in reader.tensors})


def _read(path: str | Path) -> _Summary:
    stat = Path(path).stat()
    return _summary(str(Path(path).resolve()), (stat.st_mtime_ns, stat.st_size))


def gguf_fields(path: str | Path) -> dict:
    """A GGUF file's key/value fields: name -> contents (a number, a string, a list)."""
    return {name: list(contents) if isinstance(contents, list) else contents  # copies: the cache stays as read
            for name, (contents, _) in _read(path).fields.items()}


def vocabulary_mismatch(source: Path, tokenizer) -> Optional[str]:
    """None when the GGUF file `source` holds exactly `tokenizer`'s vocabulary (same token at every id), else how
    they differ."""
    tokens = gguf_fields(source)["tokenizer.ggml.tokens"]
    vocab = tokenizer.get_vocab()
    differ = sum(vocab.get(t) != i for i, t in enumerate(tokens))
    if len(tokens) != len(vocab) or differ:
        return f"{len(tokens)} tokens in the file, {len(vocab)} in the tokenizer, {differ} at other ids"
    return None


def _copied_tokenizer(source: Path, tokenizer, rows: int) -> tuple[list, str]:
    """Every tokenizer.* field of `source`, after checking it holds this tokenizer's vocabulary, one token per row."""
    problem = vocabulary_mismatch(source, tokenizer)
    if problem:
        raise ExportError(f"{source} holds another vocabulary than the student's tokenizer ({problem}): export "
                          f"without tokenizer_gguf to build the tokenizer from the student's own.")
    fields = _read(source).fields
    tokens = len(fields["tokenizer.ggml.tokens"][0])
    if tokens != rows:
        raise ExportError(f"{source} lists {tokens} tokens but the model has {rows} output rows: llama.cpp needs one "
                          f"per row. Export without tokenizer_gguf (the built tokenizer pads the extra rows).")
    out = [(name, contents, kinds[0], kinds[1] if len(kinds) > 1 else None)
           for name, (contents, kinds) in fields.items() if name.startswith("tokenizer.")]
    return out, f"copied from {Path(source).name}"


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


def _pre_tokenizer(spec: dict, arch: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its split of text before BPE): plain byte-level is
    GPT-2's, digits split one by one before it is SmolLM's, Qwen's own pattern is qwen2. Anything else is refused:
    llama.cpp would split the text otherwise than the student was trained on."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (parts[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT or
                                            arch == "qwen2"):
        return "qwen2"
    raise ExportError(f"GGUF export does not know this tokenizer's pre-tokenization ({kinds}): llama.cpp would split "
                      f"text otherwise than the student was trained on. Pass tokenizer_gguf= a GGUF with the same "
                      f"vocabulary, or convert the saved student with llama.cpp's convert_hf_to_gguf.py.")


def _built_tokenizer(tokenizer, rows: int, arch: str) -> tuple[list, str]:
    """The tokenizer fields from a Hugging Face BPE tokenizer (tokenizer.json), padded to the model's rows."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError("GGUF export builds BPE tokenizers only (a fast tokenizer with tokenizer.json); this one "
                          "is not. Pass tokenizer_gguf= a GGUF file with the same vocabulary.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= rows:
        raise ExportError(f"The tokenizer has ids up to {max(by_id)} but the model only {rows} output rows: export "
                          f"the student with the tokenizer it was trained with (the one saved beside it).")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    t, string, k = gguf.TokenType, gguf.GGUFValueType.STRING, gguf.Keys.Tokenizer
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(t.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(t.CONTROL if i in special else t.USER_DEFINED if i in added else t.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    array, uint32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
    out = [(k.MODEL, "gpt2", string, None), (k.PRE, _pre_tokenizer(spec, arch), string, None),
           (k.LIST, tokens, array, string), (k.TOKEN_TYPE, types, array, gguf.GGUFValueType.INT32),
           (k.MERGES, merges, array, string)]
    ids = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "unk", "pad")}
    if ids["bos"] is None:  # readers expect one (transformers 5.15 fails without); add_bos_token stays as it is
        ids["bos"] = ids["eos"]
    out += [(key, int(ids[role]), uint32, None) for role, key in (("bos", k.BOS_ID), ("eos", k.EOS_ID),
                                                                  ("unk", k.UNK_ID), ("pad", k.PAD_ID))
            if ids[role] is not None]
    out.append((k.ADD_BOS, bool(getattr(tokenizer, "add_bos_token", False)), gguf.GGUFValueType.BOOL, None))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        out.append((k.CHAT_TEMPLATE, tokenizer.chat_template, string, None))
    return out, f"built from the Hugging Face tokenizer ({len(by_id)} tokens, {len(merges)} merges)"


# ------------------------------------------------------------------------------------------------ write and read
def _metadata(writer, config, name: str, quant: str) -> None:
    gguf = _gguf()
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quant]
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta") or getattr(config, "rope_theta", None) or 1e4))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model: torch.nn.Module, tokenizer, path: str | Path, quant: str = "q8_0", *,
                tokenizer_gguf: Optional[str | Path] = None, name: str = "pocket-teacher student",
                equalized: Optional[Equalization] = None, embedding: Optional[str] = None) -> ExportReport:
    """Write `model` and its tokenizer to one GGUF file at `path` (see the module's docstring); with `equalized`
    (`equalization(model, rows)`), its scales folded into the weights as they are written; with `embedding`, the
    embedding and output layer in that type (`tensor_quant`), every other matrix in `quant`."""
    _qtype(quant)
    tensor_quant("token_embd.weight", quant, embedding)  # an unknown type refused before anything is read
    gguf = _gguf()
    path = Path(path)
    if path.suffix != ".gguf":
        raise ExportError(f"{path}: a GGUF file's name ends in .gguf (e.g. {path.with_suffix('.gguf')}).")
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None), "?")
    written = _written(model, equalized)  # checked once; the tensors are read only as they are written
    layout = [(n, shape, *_layout(n, shape, tensor_quant(n, quant, embedding)))
              for n, shape in ((gguf_name(name), tuple(t.shape)) for name, t in written.items())]
    rows = int(model.config.vocab_size)
    fields, source = (_copied_tokenizer(Path(tokenizer_gguf), tokenizer, rows) if tokenizer_gguf else
                      _built_tokenizer(tokenizer, rows, arch))  # checked before anything is written
    need = sum(nbytes for *_, nbytes, _ in layout) + 64 * 2**20  # the tokenizer's fields and alignment
    require_free_space(path.parent, need, f"the {quant} GGUF file", "Free space or choose another --out.")
    with replacing(path, need, f"No partial {path.name} was left; free space and export again.") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:  # closed on any error too: a deleted file held open keeps its space taken
            _write(writer, model.config, (name, quant, embedding), fields, layout,
                   _arrays(written, model.config, equalized))
        finally:
            writer.close()
    return ExportReport(path=path, quant=quant, bytes=path.stat().st_size, tensors=len(layout),
                        parameters=sum(p.numel() for p in model.parameters()), tokenizer=source,
                        fallbacks=[fb for *_, fb in layout if fb], equalized=str(equalized or ""),
                        embedding=embedding if embedding and embedding != quant else "")


def _write(writer, config, kind: tuple[str, str, Optional[str]], fields: list, layout: list,
           arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Metadata, tokenizer fields and the tensor table from `layout`, then each tensor of `arrays` (`_arrays`) read,
    encoded and written before the next is read. `kind` is (the file's name, its type, the embedding's type or
    None)."""
    name, quant, embedding = kind
    _metadata(writer, config, name, quant)
    for key, value, kind, sub in fields:
        writer.add_key_value(key, value, kind, sub_type=sub)
    for tensor_name, shape, raw, dtype, nbytes, _ in layout:
        writer.add_tensor_info(tensor_name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (tensor_name, array), planned in zip(arrays, layout, strict=True):
        if (tensor_name, array.shape) != planned[:2]:
            raise ExportError(f"{tensor_name} {array.shape} came where {planned[0]} {planned[1]} was planned: "
                              f"the model changed during the export; export it again.")
        data, _, _ = _encode(tensor_name, array, tensor_quant(tensor_name, quant, embedding))
        writer.write_tensor_data(data)


def load_gguf(path: str | Path) -> tuple[torch.nn.Module, object]:
    """A GGUF file read back through transformers, dequantized to fp32: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist: export it first (python -m pocket_teacher export --run ...).")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 **gguf_dense())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------------ a run folder
def teacher_gguf(teacher_source: str, tokenizer, rows: Optional[int] = None) -> Optional[Path]:
    """The teacher's GGUF file when it holds the student's vocabulary, one token per output row (`rows`), so its
    tokenizer can be copied; else None (the tokenizer is then built from the student's own)."""
    try:
        path = embedded_gguf_path() if teacher_source == "embedded" else Path(teacher_source)
    except ModelLoadError:
        return None
    if path.suffix != ".gguf" or not path.is_file():
        return None
    if vocabulary_mismatch(path, tokenizer):
        return None
    if rows is not None and len(gguf_fields(path)["tokenizer.ggml.tokens"]) != rows:
        return None
    return path


def check_run(run: str | Path, model: str = "student", quant: str = "q8_0") -> Optional[Path]:
    """Refuse, with the fix, what `export_run` cannot export; the baseline's checkpoint folder for
    model="baseline", else None."""
    _qtype(quant)
    run = Path(run)
    folder = run / "student"
    if not run.is_dir():
        raise ExportError(f"{run} is not a run folder: give --run the folder a finished run wrote (runs/NAME).")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ExportError(f"{run} holds no trained student ({folder} is missing or incomplete): finish the run "
                          f"first (the command that started it, with --resume), then export.")
    if model not in ("student", "baseline"):
        raise ExportError(f"--model {model!r}: use student (the distilled one) or baseline.")
    if model == "student":
        return None
    checkpoint = newest_valid(run / "baseline" / "checkpoints", log=lambda *_: None)
    if checkpoint is None:
        raise ExportError(f"{run} has no finished baseline ({run / 'baseline' / 'checkpoints'} holds no valid "
                          f"checkpoint): train it (the command that started the run, with --resume --set "
                          f"eval.baseline=true --set train.save_final=true), then export.")
    return checkpoint


def export_run(run: str | Path, model: str = "student", quant: str = "q8_0", out: Optional[str | Path] = None,
               calibration: Optional[list | Callable[[], tuple[list, torch.device]]] = None,
               alpha: float = EQUALIZE_ALPHA, device: Optional[torch.device | str] = None,
               embedding: Optional[str] = None) -> ExportReport:
    """Export a finished run's student (or its baseline: the newest valid checkpoint of `baseline/`) to
    `out` (default <run>/<model>-<quant>.gguf). With `calibration` a q8_0 / q4_0 / q4_1 file has its activations
    equalized (`equalization`, its forward passes on `device`, default the host; the file is written from there a
    tensor at a time); without it, the weights are written as trained. `calibration` is token-id rows (the run's
    training rows), or a function returning (rows, device), called once the run folder has passed `check_run` and
    before the model is loaded: `experiment.export_from_run` passes one that rebuilds the run's rows."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, run = check_run(run, model, quant), Path(run)
    tensor_quant("token_embd.weight", quant, embedding)  # `embedding`: the embedding's type (export_gguf), checked
    if callable(calibration):
        calibration, device = calibration() if quant in EQUALIZE_QUANTS else (None, device)
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    if checkpoint is not None:
        student.load_state_dict(torch.load(checkpoint / "model.pt", map_location="cpu"))
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    source = teacher_gguf(str((config.get("teacher") or {}).get("source", "")), tokenizer, student.config.vocab_size)
    equalized = None
    if calibration and quant in EQUALIZE_QUANTS:
        equalized = equalization(student.to(device or "cpu"), calibration, alpha)
    return export_gguf(student, tokenizer, Path(out) if out else run / gguf_file_name(model, quant, embedding), quant,
                       tokenizer_gguf=source, name=f"{run.name} {model}", equalized=equalized, embedding=embedding)


# ------------------------------------------------------------------------------------------- llama.cpp, optional
LLAMA_CPP_INSTALL = ("pip install llama-cpp-python==0.3.36  (no wheel on PyPI: it builds llama.cpp from source with "
                     "CMake and a C++ compiler, about 10 minutes on 2 cores)")


def llama_cpp_version() -> Optional[str]:
    """llama-cpp-python's version, or None when it is not installed (it is kept out of the core install)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def llama_cpp_model(path: str | Path, n_ctx: int = 512, threads: Optional[int] = None, logits_all: bool = True):
    """A GGUF file loaded by llama.cpp (llama-cpp-python), one sequence of up to `n_ctx` tokens, evaluated in one
    batch; `logits_all` keeps every position's logits (for `llama_cpp_logits`). llama.cpp's extra buffer types are
    off on a CPU with AMX (`llamacpp`: its AMX kernels segfault on some)."""
    import os

    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"llama.cpp's Python binding is not installed: {LLAMA_CPP_INSTALL}") from exc
    return llamacpp.load(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads or os.cpu_count(),
                         n_threads_batch=threads or os.cpu_count(), logits_all=logits_all, verbose=False)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits at every position of `ids`, teacher-forced from an empty context: (len, V)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def compare_next_token(reference: np.ndarray, other: np.ndarray, margin: float = 0.05) -> dict:
    """Two runtimes' next-token logits on the same positions, (N, V) each: the share of positions whose top-1
    token is the same ("top1"), the same share over the positions the reference decides by at least `margin` nats
    between its first and second token ("top1_decided": a near-tie flips on any runtime's rounding, and says
    nothing about the file), and the mean and largest KL(reference || other) in nats, computed in float64."""
    if reference.shape != other.shape:
        raise ValueError(f"logits of shape {reference.shape} and {other.shape}: the two files differ in vocabulary "
                         f"or the positions differ.")
    a = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    b = torch.log_softmax(torch.from_numpy(other).double(), -1)
    kl = (a.exp() * (a - b)).sum(-1)
    same = a.argmax(-1) == b.argmax(-1)
    top2 = a.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) >= margin
    return {"top1": float(same.double().mean()), "kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_decided": float(same[decided].double().mean()) if bool(decided.any()) else None,
            "decided": int(decided.sum()), "positions": int(a.shape[0])}


# ------------------------------------------------------------------------- llama.cpp's arithmetic, in transformers
# What llama.cpp's CPU backend rounds the activations to before it multiplies them by a weight of each GGUF type
# (ggml-cpu's `vec_dot_type`): f16 for f16 weights; Q8_0 blocks for Q8_0 and Q4_0; Q8_1 blocks (Q8_0's values and a
# stored block sum) for Q4_1. The types this module writes, and the embedded teacher's.
LLAMA_CPP_ACTIVATIONS = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q8_0", "Q4_1": "q8_1"}


def llama_cpp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     weight_type: str) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as llama.cpp's CPU backend computes it when `weight` (already dequantized) is
    stored as `weight_type` (a GGUF type name): against F16 the activations are rounded to fp16 first; against Q8_0
    and Q4_0 to Q8_0 blocks along the input (32 values, scale amax / 127 stored in fp16, values x * 127 / amax
    rounded half to even, as its x86 AVX code does); against Q4_1 to Q8_1 blocks, whose block sum, stored in fp16,
    multiplies each weight block's minimum in place of the exact sum. That minimum is taken as the block's smallest
    dequantized value: exact for blocks that hold a 0 quant, as gguf-py's and llama.cpp's reference quantizers
    write them (this module's files); a file quantized with an importance matrix may not, and is then approximated.
    What is left is float summation order."""
    kind = LLAMA_CPP_ACTIVATIONS.get(weight_type)
    if kind is None:
        raise ExportError(f"llama.cpp's arithmetic against a {weight_type} weight is not modelled here (only "
                          f"{', '.join(LLAMA_CPP_ACTIVATIONS)}); compare such a file without it.")
    x, weight = x.to(torch.float32), weight.to(torch.float32)
    if kind == "f32":
        return torch.nn.functional.linear(x, weight, bias)
    if kind == "f16":
        return torch.nn.functional.linear(x.half().float(), weight, bias)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)  # a quantized weight's rows are whole blocks
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax == 0, torch.zeros_like(amax), 127 / amax.clamp_min(1e-38)))
    d = amax / 127
    scale = d.half().float()
    out = torch.nn.functional.linear((q * scale).reshape(x.shape), weight, bias)
    if kind == "q8_1":  # Q4_1's block minimum (each block's smallest dequantized value) times the stored sum
        total = q.sum(-1, keepdim=True)
        stored = (d * total).half().float()
        minimums = weight.reshape(weight.shape[0], -1, 32).amin(-1)
        out = out + (stored - scale * total).squeeze(-1) @ minimums.T
    return out


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """A GGUF file's tensors: name -> type name (F32, Q4_0 ...)."""
    return dict(_read(path).tensors)


@contextlib.contextmanager
def llama_cpp_arithmetic(model: torch.nn.Module, path: str | Path):
    """Inside this block `model`, the file at `path` read back by `load_gguf`, computes every linear layer as
    llama.cpp's CPU backend does for that tensor's type (`llama_cpp_linear`; a tied output layer multiplies by the
    embedding's type), so that what is left between the two runtimes is summation order and attention (llama.cpp
    keeps its attention cache in fp16). Yields the number of layers changed; on leaving, the model is as before."""
    types = gguf_tensor_types(path)
    changed = []
    try:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            target = gguf_name(f"{name}.weight")
            if target == "output.weight" and target not in types:
                target = "token_embd.weight"  # tied: llama.cpp multiplies by the embedding matrix
            if target not in types:
                raise ExportError(f"{name} has no tensor in {path} (looked for {target}): pass the model "
                                  f"load_gguf read from this file.")
            # the layer's forward replaced for the block (a hook would run the plain matmul too, then discard it);
            # an instance forward already there (accelerate's hooks set one) is put back on leaving
            changed.append((module, module.__dict__.get("forward")))
            module.forward = _llama_cpp_forward(module, types[target])
        yield len(changed)
    finally:
        for module, previous in changed:
            del module.forward
            if previous is not None:
                module.forward = previous


def _llama_cpp_forward(layer: torch.nn.Linear, weight_type: str):
    return lambda x: llama_cpp_linear(x, layer.weight, layer.bias, weight_type)
