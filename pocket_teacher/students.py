"""Students built from the teacher: which layers to keep, and narrower students of its architecture family.

    scores = block_influence(teacher, batches)                 # ShortGPT: 1 - cos(h_in, h_out) per layer
    keep = select_layers(scores, 10)                           # the 10 layers that change the stream most
    student = config_student(teacher, {"num_layers": 10, "hidden_size": 384, "intermediate_size": 1024},
                             init="prune", batches=batches)    # Minitron-style width + depth pruning

- Depth by importance (ShortGPT, Men et al. 2024): a layer whose output is nearly its input (cosine close to 1 on
  calibration tokens) changes little and is the first to go.
- Width by activation importance (Minitron, Muralidharan et al. 2024): on calibration batches, the mean magnitude
  of each embedding channel (the residual stream), of each MLP channel (the input of the down projection) and of
  each attention head's output (the input of the output projection); the student keeps the largest, and its weights
  are the teacher's rows and columns for them. Grouped-query attention keeps whole key/value groups (ranked by
  their heads' summed importance) and, inside each kept group, its most important query heads.
- Random init builds the same shape from the config with fresh weights (seeded), for comparison.

Pruning reads Llama-style module names (q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm: Llama,
SmolLM, Qwen2, Mistral); other families get random init or a clear error.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Optional, Sequence

import torch

from .models import (ModelInfo, ModelLoadError, count_parameters, decoder_layers, derive_student, ensure_pad,
                     load_pretrained, memory_footprint, resolve_precision, spread_layers)

SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


def calibration_batches(tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> list[dict]:
    """Right-padded batches of `texts` (e.g. formatted training rows) for the importance measurements."""
    batches = []
    for lo in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[lo:lo + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not batches:
        raise ModelLoadError("Importance-based students need calibration text: the training split is empty.")
    return batches


@torch.no_grad()
def block_influence(model: torch.nn.Module, batches: Sequence[dict]) -> list[float]:
    """ShortGPT's block influence of each decoder layer: 1 - mean cosine similarity between the hidden state
    entering and leaving it (read by hooks on the layer), over the real (unpadded) tokens of `batches`."""
    _, layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    state = {"mask": None, "inputs": {}}

    def before(i, module, args, kwargs):
        state["inputs"][i] = args[0] if args else kwargs["hidden_states"]

    def after(i, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(state["inputs"].pop(i).float(), out.float(), dim=-1)
        sums[i] += float(cos[state["mask"]].double().sum())

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(functools.partial(before, i), with_kwargs=True),
                         layer.register_forward_hook(functools.partial(after, i), with_kwargs=True))]
    count = sum(int(mask.sum()) for mask, _ in _hooked_passes(model, batches, handles, state))
    return [1.0 - float(s) / max(count, 1) for s in sums]


def _hooked_passes(model: torch.nn.Module, batches: Sequence[dict], handles: list, state: dict, **kwargs):
    """Each calibration batch's (real-token mask, model output), in eval mode, with the mask in `state["mask"]` for
    the hooks; the hooks' `handles` are removed at the end."""
    device = next(model.parameters()).device
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs = {"logits_to_keep": 1, **kwargs}  # the hooks read hidden states: the output layer over every
        # position would be (tokens, V) of needless work (about a fifth of a pocket-text student's pruning on CPU)
    model.eval()
    try:
        for batch in batches:
            state["mask"] = mask = batch["attention_mask"].to(device).bool()
            yield mask, model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(), **kwargs)
    finally:
        for h in handles:
            h.remove()


def select_layers(scores: Sequence[float], keep: int) -> list[int]:
    """The `keep` layers with the highest importance, in model order."""
    if not 1 <= keep <= len(scores):
        raise ModelLoadError(f"student.num_layers={keep}: the teacher has {len(scores)} layers; keep 1-{len(scores)}.")
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


@torch.no_grad()
def activation_importance(model: torch.nn.Module, batches: Sequence[dict]) -> dict:
    """Minitron's activation-based importance on calibration tokens: "embedding" (hidden,) mean |x| of each
    residual-stream channel over every layer's input; "mlp" [(intermediate,)] mean |x| of each MLP channel at the
    down projection's input; "heads" [(heads,)] mean L2 norm of each head's output at the output projection's
    input. Padding never counts."""
    _, layers = decoder_layers(model)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    acc = {"embedding": 0.0, "mlp": [0.0] * len(layers), "heads": [0.0] * len(layers)}
    state = {"mask": None}

    def record(kind: str, i: int, module, args):
        x = args[0].float()[state["mask"]]  # (tokens, features): MLP channels, or heads x head_dim
        acc[kind][i] = acc[kind][i] + (x.abs() if kind == "mlp" else x.view(-1, heads, head_dim).norm(dim=-1)).sum(0)

    handles = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in needed) or not hasattr(mlp, "down_proj"):
            raise ModelLoadError(f"student.init=prune reads Llama-style layers (self_attn.q/k/v/o_proj, mlp.gate/up/"
                                 f"down_proj); {type(layer).__name__} has another layout. Use student.init=random.")
        handles += [mlp.down_proj.register_forward_pre_hook(functools.partial(record, "mlp", i)),
                    attn.o_proj.register_forward_pre_hook(functools.partial(record, "heads", i))]
    tokens = 0
    for mask, out in _hooked_passes(model, batches, handles, state, output_hidden_states=True):
        acc["embedding"] = acc["embedding"] + sum(h.float()[mask].abs().sum(0) for h in out.hidden_states[:-1])
        tokens += int(mask.sum())
    n = max(tokens, 1)
    return {"embedding": acc["embedding"] / (n * len(layers)), "mlp": [m / n for m in acc["mlp"]],
            "heads": [h / n for h in acc["heads"]]}


def student_config(teacher_config, shape: dict):
    """The teacher's config with the student's shape (None keeps the teacher's value); checked for consistency."""
    config = copy.deepcopy(teacher_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    heads = shape.get("num_heads") or config.num_attention_heads
    kv = shape.get("num_kv_heads") or min(getattr(config, "num_key_value_heads", heads) or heads, heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = shape.get("hidden_size") or config.hidden_size
    if heads % kv:
        raise ModelLoadError(f"student.num_heads={heads} is not a multiple of student.num_kv_heads={kv}.")
    config.num_hidden_layers = shape.get("num_layers") or config.num_hidden_layers
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = hidden, heads, kv
    if hasattr(teacher_config, "head_dim"):  # Llama-style: the teacher's head size is kept (heads*dim may != hidden)
        config.head_dim = head_dim
    elif hidden % heads:
        raise ModelLoadError(f"student.hidden_size={hidden} is not a multiple of student.num_heads={heads}, which "
                             f"{type(teacher_config).__name__} needs.")
    if hasattr(config, "n_inner"):  # GPT-2 names its MLP width n_inner (None = 4 x width)
        config.n_inner = shape.get("intermediate_size") or config.n_inner
    else:
        config.intermediate_size = shape.get("intermediate_size") or config.intermediate_size
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    return config


def config_student(teacher: torch.nn.Module, shape: dict, init: str = "random", batches: Optional[list] = None,
                   layer_selection: str = "importance", seed: int = 0) -> torch.nn.Module:
    """A student of the teacher's architecture family with `shape` (num_layers, hidden_size, num_heads,
    num_kv_heads, intermediate_size; None keeps the teacher's), fp32 and trainable: fresh weights (init=random,
    seeded) or the teacher's most important layers, heads and channels (init=prune, measured on `batches`)."""
    from transformers import AutoModelForCausalLM

    if init not in ("random", "prune"):
        raise ModelLoadError(f"student.init={init!r}: use random or prune.")
    config = student_config(teacher.config, shape)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if init == "prune":
        if getattr(teacher, "is_loaded_in_8bit", False) or getattr(teacher, "is_loaded_in_4bit", False):
            raise ModelLoadError("student.init=prune needs the teacher's dense weights; load the teacher in bf16/fp32.")
        if batches is None:
            raise ModelLoadError("student.init=prune needs calibration batches (calibration_batches of training text).")
        check_prunable(teacher.config, config)
        keep_layers = (select_layers(block_influence(teacher, batches), config.num_hidden_layers)
                       if layer_selection == "importance"
                       else spread_layers(len(decoder_layers(teacher)[1]), config.num_hidden_layers))
        student.load_state_dict(pruned_state(teacher, config, keep_layers, activation_importance(teacher, batches)),
                                strict=True)
        student.config.pruned_from_layers = keep_layers
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device).train()


def check_prunable(teacher_config, config) -> None:
    """Pruning keeps a subset of the teacher's units: every dimension of the student must fit inside the teacher's,
    and each kept key/value group keeps some of that group's query heads. Raises ModelLoadError naming the field."""
    t_heads = teacher_config.num_attention_heads
    t_kv = getattr(teacher_config, "num_key_value_heads", None) or t_heads
    s_heads, s_kv = config.num_attention_heads, config.num_key_value_heads
    limits = [("num_layers", config.num_hidden_layers, teacher_config.num_hidden_layers, "layers"),
              ("hidden_size", config.hidden_size, teacher_config.hidden_size, "embedding channels"),
              ("intermediate_size", getattr(config, "intermediate_size", 0),
               getattr(teacher_config, "intermediate_size", 0), "MLP channels"),
              ("num_kv_heads", s_kv, t_kv, "key/value heads"),
              ("num_heads / num_kv_heads", s_heads // s_kv, t_heads // t_kv, "query heads per key/value head")]
    for name, student, teacher, what in limits:
        if student > teacher:
            raise ModelLoadError(
                f"student.init=prune: student.{name} gives {student} {what}, more than the teacher's {teacher}; a "
                f"pruned student keeps a subset of the teacher's units. Lower it to at most {teacher}, or use "
                f"student.init=random.")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores.float(), k).indices).values


def pruned_state(teacher: torch.nn.Module, config, keep_layers: list[int], importance: dict) -> dict:
    """The student's state dict: the teacher's weights restricted to the kept layers, embedding channels, heads
    (whole key/value groups) and MLP channels."""
    t = teacher.config
    t_heads, t_kv = t.num_attention_heads, getattr(t, "num_key_value_heads", t.num_attention_heads)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t_heads
    hc = _top(importance["embedding"], config.hidden_size)
    prefix, _ = decoder_layers(teacher)
    plans = {}
    for j, i in enumerate(keep_layers):
        heads = importance["heads"][i]
        per_group_t, per_group_s = t_heads // t_kv, config.num_attention_heads // config.num_key_value_heads
        groups = _top(heads.view(t_kv, per_group_t).sum(1), config.num_key_value_heads)
        kept_heads = torch.cat([g * per_group_t + _top(heads.view(t_kv, per_group_t)[g], per_group_s)
                                for g in groups.tolist()])
        plans[i] = (j, _rows(kept_heads, head_dim), _rows(groups, head_dim),
                    _top(importance["mlp"][i], config.intermediate_size))
    state = {}
    for key, value in teacher.state_dict().items():
        value = value.detach().float()
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) not in plans:
                continue
            j, q_rows, kv_rows, mc = plans[int(index)]
            state[f"{prefix}.{j}.{rest}"] = _slice_layer(rest, value, hc, q_rows, kv_rows, mc)
        elif value.dim() == 2:  # embeddings and the output layer: every token, the kept channels
            state[key] = value[:, hc].clone()
        else:  # the final norm
            state[key] = value[hc].clone()
    return state


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


def _slice_layer(name: str, w: torch.Tensor, hc, q_rows, kv_rows, mc) -> torch.Tensor:
    rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": mc, "up_proj": mc}
    columns = {"o_proj": q_rows, "down_proj": mc}  # these write the residual stream: its kept rows
    module, kind = name.rsplit(".", 1)[0].split(".")[-1], name.rsplit(".", 1)[1]
    if module.endswith("layernorm"):  # input / post-attention norms act on the residual stream
        return w[hc].clone()
    if module in ("q_norm", "k_norm"):  # per-head norms (Qwen3) act on one head's channels: kept whole
        return w.clone()
    if module in rows:
        return (w[rows[module]][:, hc] if kind == "weight" else w[rows[module]]).clone()
    if module in columns:
        return (w[hc][:, columns[module]] if kind == "weight" else w[hc]).clone()
    raise ModelLoadError(f"student.init=prune: no rule for the teacher weight {name}; use student.init=random.")


def load_student(student_cfg, teacher: torch.nn.Module, teacher_tokenizer, device: torch.device | str = "cpu",
                 calibration_texts: Optional[Sequence[str]] = None):
    """(trainable fp32 model, tokenizer, ModelInfo): derived from the teacher, built from a config (random or
    pruned), or loaded. Importance-based choices (layer_selection=importance, init=prune) read
    `calibration_texts` (formatted training rows)."""
    device = torch.device(device)
    importance = ((student_cfg.source == "derive" and student_cfg.layer_selection == "importance"
                   and student_cfg.layers is None)
                  or (student_cfg.source == "config" and student_cfg.init == "prune"))
    batches = None
    if importance:
        if not calibration_texts:
            raise ModelLoadError("student.layer_selection=importance / student.init=prune need calibration text "
                                 "(the training rows); none was given.")
        batches = calibration_batches(teacher_tokenizer, calibration_texts)
    tokenizer = teacher_tokenizer  # a derived or configured student shares the teacher's
    if student_cfg.source == "derive":
        layers = student_cfg.layers
        if layers is None and student_cfg.layer_selection == "importance":
            layers = select_layers(block_influence(teacher, batches), student_cfg.num_layers)
        model = derive_student(teacher, layers, student_cfg.num_layers)
        origin = f"teacher layers {model.config.derived_from_layers} ({student_cfg.layer_selection})"
        name = f"{model.config.num_hidden_layers}-layer student"
    elif student_cfg.source == "config":
        shape = {k: getattr(student_cfg, k) for k in SHAPE_KEYS}
        model = config_student(teacher, shape, student_cfg.init, batches, student_cfg.layer_selection)
        c = model.config
        origin = (f"{student_cfg.init} init" + (f" from teacher layers {c.pruned_from_layers} "
                                                 f"({student_cfg.layer_selection})" if student_cfg.init == "prune"
                                                 else ""))
        mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
        name = (f"{c.num_hidden_layers}-layer {type(model).__name__} (hidden {c.hidden_size}, {c.num_attention_heads} "
                f"heads, MLP {mlp})")
    else:
        model, tokenizer, origin = load_pretrained(student_cfg.source, student_cfg.revision, "student", "fp32", device)
        name = student_cfg.source
        ensure_pad(tokenizer)
    model = model.to(device=device, dtype=torch.float32).requires_grad_(True)
    precision = resolve_precision("auto", device, "student")
    info = ModelInfo("student", name, origin, f"fp32 weights, {precision} compute", str(device),
                     count_parameters(model), memory_footprint(model))
    return model.train(), tokenizer, info
