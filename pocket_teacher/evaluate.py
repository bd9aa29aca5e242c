"""Evaluation that tells the truth: every accuracy comes with its 95% interval and its rows.

- `perplexity`: exp(mean NLL) over answer tokens only;
- `gsm8k_accuracy`: batched greedy generation (left padding, stops at the end of the answer),
  final-number extraction and exact numeric match, optional few-shot turns;
- `mmlu_accuracy`: the standard zero- / k-shot multiple-choice prompt, scored by the next-token
  log-probabilities of the four answer letters (no generation); per subject, micro and macro;
- `agreement`: teacher-student top-1 agreement and mean KL on held-out answers;
- `efficiency`: parameters, size on disk, peak memory, latency per token and throughput.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .batches import (AnswerHidden, answer_batches, answer_hidden, answer_logit_chunks, answer_logits,
                      auto_chunk_size, hidden_logit_chunks, length_batches)
from .config import GenerateConfig, LossConfig
from .data import (IGNORE_INDEX, MMLU_LETTERS, Example, LoadReport, PaddingCollator, TokenizedSplit, answers_match,
                   extract_gsm8k_answer, format_prompt)
from .files import proc_value
from .generate import GREEDY, generate, overridden_generation_settings, sample_rollouts
from .losses import Divergence, TeacherLogits, kl, token_distillation_loss
from .models import count_parameters, memory_footprint, output_layer
from .plan import PlanError, inference_bytes_per_token
from .progress import tqdm


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_token_budget(model: torch.nn.Module, fraction: float = 0.5) -> Optional[int]:
    """Padded tokens per evaluation batch that fit in `fraction` of the GPU's free memory (None on CPU):
    the free bytes divided by the plan's transient bytes per token of this model."""
    device = _device(model)
    if device.type != "cuda":
        return None
    try:
        per_token = inference_bytes_per_token(model)
    except PlanError:  # a config without Llama-style size names (GPT-2's n_embd ...): no cap
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(64, int(fraction * free / per_token))


@dataclass(frozen=True)
class HeldOutTeacher:
    """What `perplexity` needs to measure the distillation term too: the teacher's signal (the top-k `cache` of the
    split scored, else the live `model`'s logits), the loss settings, and a divergence function instead of the one
    they name."""

    spec: LossConfig
    divergence: Optional[Divergence] = None
    cache: Optional[object] = None  # a teacher_cache.TopKCache of the split
    model: Optional[torch.nn.Module] = None


@torch.no_grad()
def perplexity(model: torch.nn.Module, split: TokenizedSplit, *, pad_token_id: int, batch_size: int = 16,
               vocab_size: Optional[int] = None, desc: str = "perplexity", progress: bool = True,
               per_row: bool = False, teacher: Optional[HeldOutTeacher] = None) -> dict:
    """exp(mean NLL) over answer tokens only (prompt and padding never count), over the first `vocab_size`
    logits (the tokenizer's; an output layer's padding rows never take probability, as in the losses).

    Runs on the model's device a chunk of tokens at a time (never the (N, V) logits of a batch, nothing of
    size V on the host); batches hold at most `batch_size` rows and, on a GPU, what its free memory allows.
    Returns {"perplexity", "nll", "tokens"}; with `per_row`, also "row_nll" and "row_tokens": each row's summed
    NLL and answer-token count, in split order (for paired comparisons of two models on the same items); with a
    `teacher`, also "kd": the mean per-token distillation term (T^2 * D, as in training) on the same tokens."""
    model.eval()
    device = _device(model)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens, total_kd = 0, 0.0
    row_nll = torch.zeros(len(split), dtype=torch.float64, device=device)
    row_tokens = [0] * len(split)
    batches = answer_batches(split, pad_token_id, batch_size=batch_size, by_length=True,
                             max_tokens=batch_token_budget(model), device=device)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        owner = torch.tensor(batch.rows, device=device)[batch.select.nonzero()[:, 0]]  # the split row of each target
        signal = None
        if teacher is not None:  # the cache's top-k of these rows, else the live teacher's logits
            signal = (teacher.cache.rows(batch.rows, batch.answer_counts, device) if teacher.cache is not None else
                      TeacherLogits(answer_logits(teacher.model, batch.input_ids, batch.attention_mask, batch.select)))
        for i, logits in answer_logit_chunks(model, batch.input_ids, batch.attention_mask, batch.select, vocab_size):
            j = i + logits.shape[0]
            nll = F.cross_entropy(logits, batch.targets[i:j], reduction="none").double()
            total_nll += nll.sum()
            if per_row:
                row_nll.index_add_(0, owner[i:j], nll)
            if signal is not None:
                total_kd += float(token_distillation_loss(
                    logits, batch.targets[i:j], signal.chunk(i, j, logits.shape[-1]), teacher.spec,
                    vocab_size=vocab_size, normalizer=1.0, divergence=teacher.divergence).kd)
        for r, n in zip(batch.rows, batch.answer_counts):
            row_tokens[r] = n
        total_tokens += batch.targets.numel()
    nll = float(total_nll) / max(total_tokens, 1)
    out = {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}
    if per_row:
        out.update(row_nll=row_nll.tolist(), row_tokens=row_tokens)
    if teacher is not None:
        out["kd"] = total_kd / max(total_tokens, 1)
    return out


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and at small n)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


LM_EVAL_GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k's `until`
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def lm_eval_gsm8k_prompts(examples: Sequence[Example], pool: Sequence[Example], k: int,
                          seed: int = LM_EVAL_FEWSHOT_SEED) -> list[str]:
    """lm-evaluation-harness ``gsm8k`` contexts: for each question in order, `k` training rows drawn by one
    ``random.Random(seed)`` shared across questions (``rnd.sample(pool, k)``), each ``Question: q\nAnswer: a``
    with the published answer (calculator notes kept), joined by blank lines, then ``Question: q\nAnswer:``.
    Plain text, no chat template."""
    rnd = random.Random(seed)
    out = []
    for e in examples:
        shots = rnd.sample(list(pool), k) if k else []
        text = "".join(f"Question: {s.question}\nAnswer: {s.reference or s.target}\n\n" for s in shots)
        out.append(text + f"Question: {e.question}\nAnswer:")
    return out


_LM_EVAL_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def lm_eval_gsm8k_match(output: str, reference: str) -> dict:
    """lm-eval gsm8k's two filters on a model output, each scored by its exact_match (case and the `,` `$`
    `.*#### ` `.$` patterns ignored on both sides): strict-match takes the first ``#### number``;
    flexible-extract the last number-like span. Returns {"strict": bool, "flexible": bool}."""
    def clean(text: str) -> str:
        for pattern in _LM_EVAL_IGNORE:
            text = pattern.sub("", text)
        return text.lower()

    strict = _STRICT.search(output)
    spans = _FLEXIBLE.findall(output)
    flexible = next((g for g in spans[-1] if g), None) if spans else None
    gold = clean(reference)
    return {"strict": strict is not None and clean(strict.group(1)) == gold,
            "flexible": flexible is not None and clean(flexible) == gold}


def gsm8k_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example],
                   settings: Optional[GenerateConfig] = None, *, system_prompt: Optional[str] = None,
                   shots: Sequence[Example] = (), fewshot: str = "first", num_fewshot: int = 5,
                   desc: str = "GSM8K", progress: bool = True) -> dict:
    """Exact-match accuracy of the final number, with a 95% interval and every row for inspection.

    Greedy decoding with `settings`' budget and batch size (default: 192 new tokens, batches of 16).

    fewshot="first": `shots` (worked examples from the training split, never the questions scored) shown before
    each question as earlier conversation turns of the chat template. fewshot="lm_eval": lm-eval's ``gsm8k``
    protocol, `num_fewshot` rows drawn from `shots` (the training pool) with seed 1234, plain text, its stop
    strings; the rows and the result then also carry lm-eval's strict-match and flexible-extract scores.
    Returns {"accuracy", "correct", "total", "ci95", "seconds", "rows"} (+ "strict_match", "flexible_extract");
    each row holds the question, the model's output, the extracted number and the gold one."""
    lm_eval = fewshot == "lm_eval"
    if fewshot not in ("first", "lm_eval"):
        raise ValueError(f"fewshot={fewshot!r}: use 'first' or 'lm_eval'.")
    if lm_eval:
        prompts = lm_eval_gsm8k_prompts(examples, shots, num_fewshot if shots else 0)
        stop = LM_EVAL_GSM8K_STOP
    else:
        pairs = [(e.question, e.target) for e in shots]
        prompts = [format_prompt(tokenizer, e.question, system_prompt, pairs) for e in examples]
        stop = () if getattr(tokenizer, "chat_template", None) else ("\nQuestion:",)
    start = time.perf_counter()
    settings = settings or GenerateConfig(max_new_tokens=192, batch_size=16)
    if settings.temperature:
        raise ValueError(f"temperature={settings.temperature}: accuracy is measured greedily (temperature 0).")
    outputs = generate(model, tokenizer, prompts, settings, stop=stop, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    rows = []
    for example, output in zip(examples, outputs):
        predicted = extract_gsm8k_answer(output)
        rows.append({"where": example.where, "question": example.question, "output": output,
                     "extracted": predicted, "gold": example.answer, "correct": answers_match(predicted, example.answer)})
        if lm_eval:
            match = lm_eval_gsm8k_match(output, example.reference or example.target)
            rows[-1].update(strict_match=match["strict"], flexible_extract=match["flexible"])
    correct = sum(r["correct"] for r in rows)
    extra = {key: sum(r[key] for r in rows) / max(len(rows), 1) for key in ("strict_match", "flexible_extract")
             if lm_eval}
    return {"accuracy": correct / max(len(rows), 1), "correct": correct, "total": len(rows),
            "ci95": wilson_interval(correct, len(rows)), "seconds": seconds, "rows": rows, "decoding": "greedy",
            "fewshot": fewshot, **extra, "overridden": overridden_generation_settings(model)}


# -- MMLU: letter scoring -----------------------------------------------------------------------------------

def mmlu_prompt(example: Example, shots: Sequence[Example] = ()) -> str:
    """The standard MMLU prompt (Hendrycks et al.): a subject header, k solved questions, the question.

    ``The following are multiple choice questions (with answers) about <subject>.`` then, per
    question, the stem, the choices as ``A. ...`` lines and ``Answer:`` (followed by `` X`` for shots)."""
    def block(e: Example) -> str:
        return "\n".join([e.stem] + [f"{MMLU_LETTERS[i]}. {c}" for i, c in enumerate(e.choices)]) + "\nAnswer:"

    return _mmlu_text(example, shots, "multiple choice questions (with answers)", block, lambda s: s.answer)


def _mmlu_text(example: Example, shots: Sequence[Example], kind: str, block, answer) -> str:
    """The header naming `example`'s subject, each shot's `block` followed by its `answer`, then `example`'s block."""
    if example.choices is None or example.stem is None:
        raise ValueError(f"{example.where}: not an MMLU example (no stem / choices); load it with data.load_mmlu.")
    subject = (example.subject or "general knowledge").replace("_", " ")
    solved = "".join(f"{block(s)} {answer(s)}\n\n" for s in shots)
    return f"The following are {kind} about {subject}.\n\n{solved}{block(example)}"


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the four answer letters as they follow ``Answer:`` (`` A``, else ``A``)."""
    ids = []
    for letter in MMLU_LETTERS:
        for text in (" " + letter, letter):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.append(enc[0])
                break
        else:
            raise ValueError(f"The tokenizer splits the answer letter {letter!r} into several tokens; "
                             f"MMLU letter scoring needs one token per letter.")
    if len(set(ids)) != 4:
        raise ValueError(f"The answer letters map to repeated token ids {ids}; cannot score MMLU by letter.")
    return ids


def _by_subject(examples: Sequence[Example]) -> dict[str, list[Example]]:
    pool: dict[str, list[Example]] = {}
    for e in examples:
        pool.setdefault(e.subject, []).append(e)
    return pool


def _mmlu_shots(example: Example, pool: dict[str, list[Example]], k: int) -> list[Example]:
    return [e for e in pool.get(example.subject, []) if e.where != example.where][:k]


@torch.no_grad()
def mmlu_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, shots: int = 0,
                  shot_pool: Optional[Sequence[Example]] = None, batch_size: int = 16, max_length: int = 2048,
                  desc: str = "MMLU", progress: bool = True) -> dict:
    """MMLU accuracy by comparing the next-token log-probabilities of A, B, C and D (no generation).

    Args:
        examples: MMLU examples (`data.load_mmlu`), e.g. the 14,042-question test split.
        shots: solved questions of the same subject shown first (0 = zero-shot; 5 is the standard).
        shot_pool: where shots come from (the dev split); default: the other questions of `examples`
            in the same subject (never the question itself).
        max_length: prompts longer than this drop shots until they fit (counted in "shots_dropped").

    Returns {"accuracy" (micro), "macro" (mean over subjects), "correct", "total", "ci95",
    "per_subject": {subject: {"correct", "total", "accuracy", "ci95"}}, "rows", "seconds",
    "predicted_letters" ({letter: count}), "favourite_letter" (the one predicted most) and
    "favourite_letter_accuracy" (what always answering it would score: the letter-bias floor), ...}."""
    chosen = list(examples)
    pool = _by_subject(shot_pool if shot_pool is not None else examples)
    letters = torch.tensor(letter_token_ids(tokenizer))
    device = _device(model)
    encoded, dropped = [], 0
    for e in chosen:
        for k in range(shots, -1, -1):  # drop shots until the prompt fits (or none is left)
            ids = tokenizer(mmlu_prompt(e, _mmlu_shots(e, pool, k)), add_special_tokens=True)["input_ids"]
            if len(ids) <= max_length:
                break
        dropped += shots - k
        encoded.append(ids[-max_length:])
    model.eval()
    start = time.perf_counter()
    scores = [None] * len(chosen)
    collate = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, "right")
    batches = length_batches([len(ids) for ids in encoded], batch_size)  # similar lengths together: little padding
    for index in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = collate([{"input_ids": encoded[i]} for i in index])
        mask = batch["attention_mask"]
        select = torch.zeros_like(mask, dtype=torch.bool)
        select[torch.arange(len(index)), mask.sum(1) - 1] = True  # the last prompt token predicts the letter
        logits = answer_logits(model, batch["input_ids"].to(device), mask.to(device), select.to(device)).float()
        logp = torch.log_softmax(logits, -1)[:, letters.to(device)].cpu()
        for j, i in enumerate(index):
            scores[i] = logp[j]
    seconds = time.perf_counter() - start
    rows, per_subject = [], {}
    for e, score in zip(chosen, scores):
        predicted = MMLU_LETTERS[int(score.argmax())]
        correct = predicted == e.answer
        rows.append({"where": e.where, "subject": e.subject, "predicted": predicted, "gold": e.answer,
                     "correct": correct, "letter_logprobs": [round(float(x), 4) for x in score]})
        stats = per_subject.setdefault(e.subject, {"correct": 0, "total": 0})
        stats["correct"] += int(correct)
        stats["total"] += 1
    for stats in per_subject.values():
        stats["accuracy"] = stats["correct"] / stats["total"]
        stats["ci95"] = wilson_interval(stats["correct"], stats["total"])
    correct = sum(r["correct"] for r in rows)
    macro = sum(v["accuracy"] for v in per_subject.values()) / max(1, len(per_subject))
    predicted = {letter: sum(r["predicted"] == letter for r in rows) for letter in MMLU_LETTERS}
    favourite = max(MMLU_LETTERS, key=predicted.get)
    return {"accuracy": correct / max(1, len(rows)), "macro": macro, "correct": correct, "total": len(rows),
            "ci95": wilson_interval(correct, len(rows)), "per_subject": dict(sorted(per_subject.items())),
            "predicted_letters": predicted, "favourite_letter": favourite,
            "favourite_letter_accuracy": sum(r["gold"] == favourite for r in rows) / max(1, len(rows)),
            "shots": shots, "shots_dropped": dropped, "seconds": seconds, "rows": rows}


# -- MMLU: cloze scoring -------------------------------------------------------------------------------------------

def mmlu_cloze_context(example: Example, shots: Sequence[Example] = ()) -> str:
    """lm-evaluation-harness's ``mmlu_continuation`` context: ``The following are questions (with answers) about
    <subject>.`` then, per question, ``Question: <stem>`` and ``Answer:`` (shots end with `` <answer text>``).
    No lettered choices: each choice's text is scored as the continuation."""
    return _mmlu_text(example, shots, "questions (with answers)", lambda e: f"Question: {e.stem.strip()}\nAnswer:",
                      lambda s: s.choices[MMLU_LETTERS.index(s.answer)])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of a context and its continuation as lm-evaluation-harness encodes them: trailing spaces of the
    context move to the continuation, the whole string is encoded once and split at the context's length (so
    the first continuation token is the one the tokenizer really produces after the context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    return whole[:start], whole[start:]


@torch.no_grad()
def mmlu_cloze_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, shots: int = 0,
                        shot_pool: Optional[Sequence[Example]] = None, batch_size: int = 16, max_length: int = 2048,
                        desc: str = "MMLU cloze", progress: bool = True) -> dict:
    """MMLU by the likelihood of each choice's text (lm-eval's ``mmlu_continuation``): the sum of the log-probs of
    `` <choice>`` after the question, for the four choices. `acc` takes the largest sum; `acc_norm` divides each
    sum by the choice's length in characters first (lm-eval's normalisation), which removes most of the bias
    towards short answers. Batched over all (question, choice) pairs, with per-subject results, Wilson
    intervals and per-question rows.

    Returns {"accuracy", "accuracy_norm", "correct", "correct_norm", "total", "ci95", "ci95_norm",
    "per_subject": {subject: {"accuracy", "accuracy_norm", "total"}}, "rows", "seconds"}."""
    pool = _by_subject(shot_pool if shot_pool is not None else examples)
    features = []
    for e in examples:
        context = mmlu_cloze_context(e, _mmlu_shots(e, pool, shots))
        for choice in e.choices:
            ctx, cont = encode_pair(tokenizer, context, " " + choice)
            ids = (ctx + cont)[-max_length:]
            features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - len(cont)) + cont})
    split = TokenizedSplit(features, [], LoadReport(source="MMLU cloze pairs", rows=len(features)), max_length, "")
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = perplexity(model, split, pad_token_id=pad, batch_size=batch_size, vocab_size=len(tokenizer),
                        desc=desc, progress=progress, per_row=True)
    seconds = time.perf_counter() - start
    rows, per_subject = [], {}
    for q, e in enumerate(examples):
        lls = [-scored["row_nll"][4 * q + j] for j in range(4)]
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, e.choices)]
        gold = MMLU_LETTERS.index(e.answer)
        pred, pred_norm = max(range(4), key=lls.__getitem__), max(range(4), key=norm.__getitem__)
        rows.append({"where": e.where, "subject": e.subject, "gold": e.answer, "predicted": MMLU_LETTERS[pred],
                     "predicted_norm": MMLU_LETTERS[pred_norm], "correct": pred == gold,
                     "correct_norm": pred_norm == gold, "choice_loglik": [round(x, 4) for x in lls]})
        stats = per_subject.setdefault(e.subject, {"correct": 0, "correct_norm": 0, "total": 0})
        stats["correct"] += pred == gold
        stats["correct_norm"] += pred_norm == gold
        stats["total"] += 1
    for stats in per_subject.values():
        stats["accuracy"], stats["accuracy_norm"] = (stats["correct"] / stats["total"],
                                                     stats["correct_norm"] / stats["total"])
    n = max(1, len(rows))
    correct, correct_norm = sum(r["correct"] for r in rows), sum(r["correct_norm"] for r in rows)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm, "total": len(rows), "ci95": wilson_interval(correct, len(rows)),
            "ci95_norm": wilson_interval(correct_norm, len(rows)), "per_subject": dict(sorted(per_subject.items())),
            "shots": shots, "seconds": seconds, "rows": rows}


# -- teacher-student agreement ---------------------------------------------------------------------------------

@torch.no_grad()
def agreement(teacher: torch.nn.Module, student: torch.nn.Module, split: TokenizedSplit, *, pad_token_id: int,
              vocab_size: Optional[int] = None, batch_size: int = 16, progress: bool = True) -> dict:
    """How closely the student follows the teacher on held-out answers (teacher-forced, answer tokens only).

    Both models run on their own devices; their logits meet on the student's a chunk of tokens at a time, so neither
    (N, V) logits nor anything of size V reach the host. Returns {"top1_agreement": share of answer positions where both
    models' most likely next token is the same, "kl": mean KL(teacher || student) at T = 1 in nats/token, "tokens"}."""
    return agreements(teacher, {"student": student}, split, pad_token_id=pad_token_id, vocab_size=vocab_size,
                      batch_size=batch_size, progress=progress).students["student"]


@dataclass
class Agreements:
    """`agreements`' result: each student's {"top1_agreement", "kl", "perplexity", "nll", "tokens"} by label, the
    teacher's own {"perplexity", "nll", "tokens"} on the same answer tokens (what `perplexity` gives, from the same
    pass), and, when asked to keep them, the teacher's answer-position hidden states (`AnswerHidden`)."""

    students: dict
    teacher: dict
    teacher_hidden: Optional[AnswerHidden] = None


@torch.no_grad()
def agreements(teacher: torch.nn.Module, students: dict[str, torch.nn.Module], split: TokenizedSplit, *,
               pad_token_id: int, vocab_size: Optional[int] = None, batch_size: int = 16,
               progress: bool = True, teacher_hidden: Optional[AnswerHidden] = None,
               keep_teacher: bool = False) -> Agreements:
    """`agreement` of several students (label -> model) with one pass of the teacher: each batch's teacher logits
    meet every student's in turn, and score the teacher's own perplexity and each student's on the way
    (`Agreements`). `teacher_hidden` (kept by an earlier pass over this split, `AnswerHidden.serves`): the teacher's
    logits are rebuilt from them with its output layer alone, its decoder does not run. `keep_teacher`: keep the
    teacher's hidden states of this pass in the result (when its output layer is exact, `models.output_layer`)."""
    t_dev = _device(teacher)
    teacher.eval()
    layer = output_layer(teacher)
    if teacher_hidden is not None and (layer is None or not teacher_hidden.serves(teacher, split)):
        raise ValueError("agreements: teacher_hidden were kept from another teacher or split (or the teacher's output "
                         "layer is not exact, models.output_layer); pass the ones this teacher's pass over this split "
                         "kept, or none.")
    teacher_nll, tokens = torch.zeros((), dtype=torch.float64, device=t_dev), 0
    sums = {}
    for label, student in students.items():
        student.eval()
        dev = _device(student)
        sums[label] = [torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.float64, device=dev),
                       0, torch.zeros((), dtype=torch.float64, device=dev)]
    rows = vocab_size or teacher.get_output_embeddings().weight.shape[0]
    chunk = auto_chunk_size(rows, t_dev.type)
    budgets = [batch_token_budget(m) for m in ((teacher,) if teacher_hidden is None else ()) + (*students.values(),)]
    budget = min((b for b in budgets if b), default=None)
    batches = answer_batches(split, pad_token_id, batch_size=batch_size, by_length=True, max_tokens=budget)
    kept = {} if keep_teacher and layer is not None else None
    for batch in tqdm(batches, desc="agreement", disable=not progress, leave=False):
        on_t = batch.to(t_dev)
        tokens += batch.targets.numel()  # the positions scored (a free text's first token has no prediction)
        if layer is None:
            t_chunks = answer_logit_chunks(teacher, on_t.input_ids, on_t.attention_mask, on_t.select, vocab_size,
                                           chunk)
        else:
            hidden = (teacher_hidden.rows(batch.rows) if teacher_hidden is not None else
                      answer_hidden(teacher, on_t.input_ids, on_t.attention_mask, on_t.select))
            if kept is not None:
                for r, part in zip(batch.rows, hidden.split(batch.answer_counts)):
                    kept[r] = part.cpu()
            t_chunks = hidden_logit_chunks(hidden, layer, vocab_size, chunk)
        s_chunks = {}
        for label, student in students.items():  # the same chunks of positions, whatever each model's device
            on_s = batch.to(_device(student))
            s_chunks[label] = (on_s.targets, answer_logit_chunks(student, on_s.input_ids, on_s.attention_mask,
                                                                  on_s.select, vocab_size, chunk))
        for start, t in t_chunks:
            log_p = torch.log_softmax(t, -1)
            teacher_nll -= log_p.gather(-1, on_t.targets[start:start + t.shape[0]].unsqueeze(-1)).sum().double()
            top, here = t.argmax(-1), {}  # the teacher's log-probs, once per device a student is on
            del t
            for label, (targets, chunks) in s_chunks.items():
                _, s = next(chunks)
                if s.device not in here:
                    here[s.device] = (log_p.to(s.device), top.to(s.device))
                log_p_here, top_here = here[s.device]
                counts = sums[label]
                log_q = torch.log_softmax(s, -1)
                counts[0] += (top_here == s.argmax(-1)).sum()
                counts[1] += kl(log_p_here.reshape(1, -1), log_q.reshape(1, -1))[0].double()
                counts[2] += s.shape[0]
                counts[3] -= log_q.gather(-1, targets[start:start + s.shape[0]].unsqueeze(-1)).sum().double()
                del log_q
            del log_p, here
    nll = float(teacher_nll) / max(1, tokens)
    return Agreements({label: {"top1_agreement": int(a) / max(1, n), "kl": float(k) / max(1, n), "tokens": n,
                               "nll": float(s) / max(1, n), "perplexity": math.exp(float(s) / max(1, n))}
                       for label, (a, k, n, s) in sums.items()},
                      {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens},
                      None if kept is None else AnswerHidden(teacher, split, kept))


# -- efficiency -----------------------------------------------------------------------------------------------------

def _rss_bytes(field: str) -> Optional[int]:
    value = proc_value("/proc/self/status", field + ":")  # "1234 kB"
    return None if value is None else int(value.split()[0]) * 1024


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator peak, or the process's peak RSS on Linux
    (reset through /proc/self/clear_refs). `bytes` is None where neither can be measured."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = torch.device(device), None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # resets VmHWM, the peak resident set size
                self._base = _rss_bytes("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            peak = _rss_bytes("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._base)


def size_on_disk(model: torch.nn.Module) -> int:
    """Bytes of the model's safetensors files when saved with ``save_pretrained``."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.suffix == ".safetensors")


WARMUP_TOKENS = 8  # the untimed warm-up generation of `efficiency`


@torch.no_grad()
def efficiency(model: torch.nn.Module, tokenizer, prompt: str = "Question: What is 12 times 7?\nAnswer:", *,
               new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 16), repeats: int = 2) -> dict:
    """Size, memory and generation speed of one model on its current device.

    Greedy generation of exactly `new_tokens` tokens (EOS ignored) after `prompt`, at each batch size;
    the best of `repeats` timed runs after a short warm-up (`WARMUP_TOKENS`). Reports parameters (total and without the
    input embeddings), size on disk, weights in memory, the peak memory of the batch-16 generation
    above the weights, latency per generated token at batch 1 and tokens/s at each batch size."""
    device = _device(model)
    model.eval()
    embed = model.get_input_embeddings().weight.numel() if model.get_input_embeddings() is not None else 0
    total = count_parameters(model)
    out = {"parameters": total, "parameters_no_embeddings": total - embed, "size_on_disk": size_on_disk(model),
           "weights_memory": memory_footprint(model), "device": str(device), "new_tokens": new_tokens}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for bs in batch_sizes:
        enc = tokenizer([prompt] * bs, return_tensors="pt", add_special_tokens=False).to(device)
        kwargs = dict(GREEDY, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        kwargs.pop("min_length")  # min_new_tokens decides; both set only draws a warning per call
        # warm-up: first calls' one-time costs (allocations, kernel selection); a few tokens do it, the timed runs
        # then decode every length for the first time the same way
        model.generate(**enc, **{**kwargs, "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": WARMUP_TOKENS})
        best, sync = math.inf, torch.cuda.synchronize if device.type == "cuda" else lambda device: None
        with PeakMemory(device) as peak:
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                model.generate(**enc, **kwargs)
                sync(device)
                best = min(best, time.perf_counter() - start)
        out[f"tokens_per_s_batch{bs}"] = bs * new_tokens / best
        out[f"peak_memory_batch{bs}"] = peak.bytes
        if bs == 1:
            out["latency_ms_per_token"] = 1000 * best / new_tokens
    return out


def architecture_key(model: torch.nn.Module) -> str:
    """What a model's size and speed depend on: its class, its config without names and paths, its parameters'
    dtypes and its device. Two models with equal keys (a student before and after training) generate equally fast
    and take equal memory; only their weights' values differ."""
    config = getattr(model, "config", None)
    shape = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
             if k not in ("_name_or_path", "name_or_path", "transformers_version", "architectures")}
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return json.dumps([type(model).__name__, shape, dtypes, str(_device(model))], sort_keys=True, default=str)


@dataclass
class Known:
    """What a run measured already and an evaluation reuses instead of measuring again: speed and size figures by
    `architecture_key` ((label, figures); a new measurement is added), this model's held-out perplexity (the
    training's last held-out score, taken on these very weights and the same split) and its agreement with the
    teacher (`agreements`: one teacher pass for several students)."""

    speed: dict = field(default_factory=dict)
    perplexity: Optional[dict] = None  # {"perplexity", "tokens", "from"}
    agreement: Optional[dict] = None  # this model's `agreement` with the teacher, from a pass shared with others
    teacher: Optional[torch.nn.Module] = None  # else agreement is measured with this teacher (eval.agreement)


def evaluate_model(label: str, model: torch.nn.Module, tokenizer, eval_split: TokenizedSplit, eval_cfg, *,
                   system_prompt: Optional[str] = None, gsm_shots: Sequence[Example] = (),
                   mmlu_examples: Optional[Sequence[Example]] = None, progress: bool = True,
                   known: Optional[Known] = None) -> dict:
    """One results row: perplexity, GSM accuracy, MMLU, agreement with `teacher`, efficiency.

    What runs follows `eval_cfg` (generate_samples, agreement, efficiency) and the inputs given
    (`mmlu_examples`, `known.teacher`). Per-question rows are kept under "generations" and "mmlu_rows"
    (left out of the table, saved by the pipeline). `known`: what the run measured already (`Known`): a model of
    an architecture already timed reuses those speed figures (the row names that model in "efficiency_of"), and a
    perplexity already taken on these weights is reused (the row says where from in "perplexity_of")."""
    known = known or Known()
    if known.perplexity is not None:
        ppl = known.perplexity
    else:
        ppl = perplexity(model, eval_split, pad_token_id=tokenizer.pad_token_id, batch_size=eval_cfg.batch_size,
                         vocab_size=len(tokenizer), desc=f"{label}: perplexity", progress=progress)
    row = {"model": label, "parameters": count_parameters(model), "perplexity": ppl["perplexity"],
           "answer_tokens": ppl["tokens"], **({"perplexity_of": ppl["from"]} if "from" in ppl else {})}
    if eval_cfg.generate_samples > 0 and eval_split.examples and eval_split.examples[0].answer:  # not free text
        mode = getattr(eval_cfg, "gsm8k_fewshot", "first")
        acc = gsm8k_accuracy(model, tokenizer, eval_split.examples[:eval_cfg.generate_samples],
                             GenerateConfig(max_new_tokens=eval_cfg.max_new_tokens,
                                            batch_size=eval_cfg.generate_batch_size or eval_cfg.batch_size),
                             system_prompt=system_prompt, shots=gsm_shots, fewshot=mode,
                             num_fewshot=eval_cfg.gsm8k_shots, desc=f"{label}: GSM8K", progress=progress)
        row.update(accuracy=acc["accuracy"], correct=acc["correct"], questions=acc["total"],
                   ci95_low=acc["ci95"][0], ci95_high=acc["ci95"][1], generation_s=acc["seconds"],
                   decoding="greedy" + (" (overrode the model's " + ", ".join(
                       f"{k}={v}" for k, v in acc["overridden"].items()) + ")" if acc["overridden"] else ""),
                   generations=acc["rows"])
        row.update({k: acc[k] for k in ("strict_match", "flexible_extract") if k in acc})
    if mmlu_examples:
        row.update(mmlu_scores(model, tokenizer, mmlu_examples, eval_cfg, label, progress))
    if known.agreement is not None:
        row.update(top1_agreement=known.agreement["top1_agreement"], kl_to_teacher=known.agreement["kl"])
    elif known.teacher is not None and known.teacher is not model and getattr(eval_cfg, "agreement", False):
        agree = agreement(known.teacher, model, eval_split, pad_token_id=tokenizer.pad_token_id,
                          vocab_size=len(tokenizer), batch_size=eval_cfg.batch_size, progress=progress)
        row.update(top1_agreement=agree["top1_agreement"], kl_to_teacher=agree["kl"])
    if getattr(eval_cfg, "efficiency", False):
        key = architecture_key(model)
        if key in known.speed:
            row["efficiency_of"], eff = known.speed[key]
        else:
            eff = efficiency(model, tokenizer)
            known.speed[key] = (label, eff)
        row.update(parameters_no_embeddings=eff["parameters_no_embeddings"], size_mb=eff["size_on_disk"] / 1e6,
                   latency_ms_per_token=eff["latency_ms_per_token"], tokens_per_s_b1=eff["tokens_per_s_batch1"],
                   tokens_per_s_b16=eff["tokens_per_s_batch16"],
                   peak_memory_mb_b16=None if eff["peak_memory_batch16"] is None else eff["peak_memory_batch16"] / 1e6)
    return row


@torch.no_grad()
def teacher_on_student_samples(teacher: torch.nn.Module, student: torch.nn.Module, split: TokenizedSplit, *,
                               pad_token_id: int, eos_token_id, questions: int = 8, max_new_tokens: int = 64,
                               batch_size: int = 8, seed: int = 0, vocab_size: Optional[int] = None) -> dict:
    """How the teacher judges what the student writes: the student samples answers to the first `questions`
    held-out prompts (temperature 1), and both models score those tokens. Returns the mean log-likelihood per
    sampled token under the teacher and under the student, and the mean sample length. A teacher that finds
    the student's own samples about as likely as the student does has little to correct on-policy."""
    device, totals, tokens = _device(student), {"teacher": 0.0, "student": 0.0}, 0
    rows = list(range(min(questions, len(split))))
    for lo, batch in zip(range(0, len(rows), batch_size), answer_batches(split, pad_token_id, batch_size=batch_size,
                                                                          rows=rows, device=device)):
        rollout = sample_rollouts(student, batch, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                  seed=seed + lo, max_new_tokens=max_new_tokens, vocab_size=vocab_size).batch
        for name, model in (("teacher", teacher), ("student", student)):
            logits = answer_logits(model, rollout.input_ids, rollout.attention_mask, rollout.select)
            logits = logits[..., :vocab_size] if vocab_size else logits
            totals[name] += float(-F.cross_entropy(logits.float(), rollout.targets, reduction="sum"))
        tokens += rollout.targets.numel()
    n = max(tokens, 1)
    return {"samples": len(rows), "sample_tokens_mean": tokens / max(len(rows), 1),
            "teacher_logprob_per_token": totals["teacher"] / n, "student_logprob_per_token": totals["student"] / n}


def mmlu_formats(eval_cfg, parameters: int) -> tuple[str, ...]:
    """The MMLU formats eval.mmlu_format asks for; auto is both under 1B parameters (where letter scores measure
    mostly letter bias), letter above."""
    fmt = getattr(eval_cfg, "mmlu_format", "letter")
    if fmt == "auto":
        fmt = "both" if parameters < 1e9 else "letter"
    return ("letter", "cloze") if fmt == "both" else (fmt,)


def mmlu_scores(model: torch.nn.Module, tokenizer, examples: Sequence[Example], eval_cfg, label: str,
                progress: bool = True) -> dict:
    """The MMLU columns of a results row: letter (mmlu*) and/or cloze (mmlu_cloze*), per eval.mmlu_format."""
    row = {}
    formats = mmlu_formats(eval_cfg, count_parameters(model))
    if "letter" in formats:
        mmlu = mmlu_accuracy(model, tokenizer, examples, shots=eval_cfg.mmlu_shots, batch_size=eval_cfg.batch_size,
                             desc=f"{label}: MMLU", progress=progress)
        row.update(mmlu=mmlu["accuracy"], mmlu_macro=mmlu["macro"], mmlu_questions=mmlu["total"],
                   mmlu_ci95_low=mmlu["ci95"][0], mmlu_ci95_high=mmlu["ci95"][1], mmlu_s=mmlu["seconds"],
                   mmlu_per_subject=mmlu["per_subject"], mmlu_rows=mmlu["rows"])
    if "cloze" in formats:
        cloze = mmlu_cloze_accuracy(model, tokenizer, examples, shots=eval_cfg.mmlu_shots,
                                    batch_size=eval_cfg.batch_size, desc=f"{label}: MMLU cloze", progress=progress)
        row.update(mmlu_cloze=cloze["accuracy"], mmlu_cloze_norm=cloze["accuracy_norm"],
                   mmlu_cloze_questions=cloze["total"], mmlu_cloze_ci95_low=cloze["ci95_norm"][0],
                   mmlu_cloze_ci95_high=cloze["ci95_norm"][1], mmlu_cloze_s=cloze["seconds"],
                   mmlu_cloze_per_subject=cloze["per_subject"], mmlu_cloze_rows=cloze["rows"])
    return row
