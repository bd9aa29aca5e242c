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

import math
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .data import (MMLU_LETTERS, Example, PaddingCollator, TokenizedSplit, answers_match, extract_gsm8k_answer,
                   format_prompt)
from .generate import GREEDY, generate, overridden_generation_settings  # noqa: F401 (re-exported)
from .models import answer_logit_chunks, answer_logits, answer_positions, count_parameters
from .progress import tqdm


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_batches(lengths: Sequence[int], batch_size: int, max_tokens: Optional[int] = None) -> list[list[int]]:
    """Row indices in batches of similar length (sorted, so little padding): at most `batch_size` rows and, with
    `max_tokens`, at most that many padded tokens per batch (a memory budget; a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) >= batch_size or (max_tokens and longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def batch_token_budget(model: torch.nn.Module, fraction: float = 0.5) -> Optional[int]:
    """Padded tokens per evaluation batch that fit in `fraction` of the GPU's free memory (None on CPU):
    the free bytes divided by the plan's transient bytes per token of this model."""
    device = _device(model)
    if device.type != "cuda":
        return None
    from .plan import PlanError, inference_bytes_per_token

    try:
        per_token = inference_bytes_per_token(model)
    except PlanError:  # a config without Llama-style size names (GPT-2's n_embd ...): no cap
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(64, int(fraction * free / per_token))


@torch.no_grad()
def perplexity(model: torch.nn.Module, split: TokenizedSplit, *, pad_token_id: int, batch_size: int = 16,
               vocab_size: Optional[int] = None, desc: str = "perplexity", progress: bool = True) -> dict:
    """exp(mean NLL) over answer tokens only (prompt and padding never count), over the first `vocab_size`
    logits (the tokenizer's; an output layer's padding rows never take probability, as in the losses).

    Runs on the model's device a chunk of tokens at a time (never the (N, V) logits of a batch, nothing of
    size V on the host); batches hold at most `batch_size` rows and, on a GPU, what its free memory allows.
    Returns {"perplexity", "nll", "tokens"}.
    """
    model.eval()
    collate = PaddingCollator(pad_token_id, "right")
    device = _device(model)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    batches = eval_batches([len(f["input_ids"]) for f in split.features], batch_size, batch_token_budget(model))
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate([split[i] for i in rows]).items()}
        select = answer_positions(batch["labels"])
        targets = batch["labels"][:, 1:][select[:, :-1]]
        for i, logits in answer_logit_chunks(model, batch["input_ids"], batch["attention_mask"], select, vocab_size):
            total_nll += F.cross_entropy(logits, targets[i:i + logits.shape[0]], reduction="sum").double()
        total_tokens += targets.numel()
    nll = float(total_nll) / max(total_tokens, 1)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and at small n)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def gsm8k_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *,
                   system_prompt: Optional[str] = None, max_new_tokens: int = 192, batch_size: int = 16,
                   shots: Sequence[Example] = (), desc: str = "GSM8K", progress: bool = True) -> dict:
    """Exact-match accuracy of the final number, with a 95% interval and every row for inspection.

    `shots`: worked examples shown before each question as earlier conversation turns (few-shot);
    take them from the training split, never from the questions scored.
    Returns {"accuracy", "correct", "total", "ci95", "seconds", "rows"}; each row holds the question,
    the model's output, the extracted number and the gold one.
    """
    pairs = [(e.question, e.target) for e in shots]
    prompts = [format_prompt(tokenizer, e.question, system_prompt, pairs) for e in examples]
    stop = () if getattr(tokenizer, "chat_template", None) else ("\nQuestion:",)
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop=stop, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    rows = []
    for example, output in zip(examples, outputs):
        predicted = extract_gsm8k_answer(output)
        rows.append({"where": example.where, "question": example.question, "output": output,
                     "extracted": predicted, "gold": example.answer, "correct": answers_match(predicted, example.answer)})
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows))
    return {"accuracy": correct / max(len(rows), 1), "correct": correct, "total": len(rows), "ci95": (low, high),
            "seconds": seconds, "rows": rows, "decoding": "greedy",
            "overridden": overridden_generation_settings(model)}


# -- MMLU: letter scoring -----------------------------------------------------------------------------------

def mmlu_prompt(example: Example, shots: Sequence[Example] = ()) -> str:
    """The standard MMLU prompt (Hendrycks et al.): a subject header, k solved questions, the question.

    ``The following are multiple choice questions (with answers) about <subject>.`` then, per
    question, the stem, the choices as ``A. ...`` lines and ``Answer:`` (followed by `` X`` for shots).
    """
    if example.choices is None or example.stem is None:
        raise ValueError(f"{example.where}: not an MMLU example (no stem / choices); load it with data.load_mmlu.")
    subject = (example.subject or "general knowledge").replace("_", " ")

    def block(e: Example) -> str:
        lines = [e.stem] + [f"{MMLU_LETTERS[i]}. {c}" for i, c in enumerate(e.choices)]
        return "\n".join(lines) + "\nAnswer:"

    text = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    text += "".join(f"{block(s)} {s.answer}\n\n" for s in shots)
    return text + block(example)


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


def _mmlu_shots(example: Example, pool: dict[str, list[Example]], k: int) -> list[Example]:
    return [e for e in pool.get(example.subject, []) if e.where != example.where][:k]


@torch.no_grad()
def mmlu_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, shots: int = 0,
                  shot_pool: Optional[Sequence[Example]] = None, subjects: Optional[Sequence[str]] = None,
                  limit: Optional[int] = None, batch_size: int = 16, max_length: int = 2048,
                  desc: str = "MMLU", progress: bool = True) -> dict:
    """MMLU accuracy by comparing the next-token log-probabilities of A, B, C and D (no generation).

    Args:
        examples: MMLU examples (`data.load_mmlu`), e.g. the 14,042-question test split.
        shots: solved questions of the same subject shown first (0 = zero-shot; 5 is the standard).
        shot_pool: where shots come from (the dev split); default: the other questions of `examples`
            in the same subject (never the question itself).
        subjects, limit: score only these subjects / the first `limit` questions after that filter.
        max_length: prompts longer than this drop shots until they fit (counted in "shots_dropped").

    Returns {"accuracy" (micro), "macro" (mean over subjects), "correct", "total", "ci95",
    "per_subject": {subject: {"correct", "total", "accuracy", "ci95"}}, "rows", "seconds",
    "predicted_letters" ({letter: count}), "favourite_letter" (the one predicted most) and
    "favourite_letter_accuracy" (what always answering it would score: the letter-bias floor), ...}.
    """
    chosen = [e for e in examples if subjects is None or e.subject in set(subjects)]
    chosen = chosen[:limit] if limit is not None else chosen
    pool: dict[str, list[Example]] = {}
    for e in (shot_pool if shot_pool is not None else examples):
        pool.setdefault(e.subject, []).append(e)
    letters = torch.tensor(letter_token_ids(tokenizer))
    device = _device(model)
    encoded, dropped = [], 0
    for e in chosen:
        k = shots
        while True:
            ids = tokenizer(mmlu_prompt(e, _mmlu_shots(e, pool, k)), add_special_tokens=True)["input_ids"]
            if len(ids) <= max_length or k == 0:
                break
            k -= 1
        dropped += shots - k
        encoded.append(ids[-max_length:])
    model.eval()
    start = time.perf_counter()
    order = sorted(range(len(chosen)), key=lambda i: len(encoded[i]))
    scores = [None] * len(chosen)
    collate = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, "right")
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        index = order[lo:lo + batch_size]
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


# -- teacher-student agreement ---------------------------------------------------------------------------------

@torch.no_grad()
def agreement(teacher: torch.nn.Module, student: torch.nn.Module, split: TokenizedSplit, *, pad_token_id: int,
              vocab_size: Optional[int] = None, batch_size: int = 16, progress: bool = True) -> dict:
    """How closely the student follows the teacher on held-out answers (teacher-forced, answer tokens only).

    Both models run on their own devices; their logits meet on the student's a chunk of tokens at a time,
    so neither (N, V) logits nor anything of size V reach the host.
    Returns {"top1_agreement": share of answer positions where both models' most likely next token is
    the same, "kl": mean KL(teacher || student) at T = 1 in nats/token, "tokens"}.
    """
    collate = PaddingCollator(pad_token_id, "right")
    t_dev, s_dev = _device(teacher), _device(student)
    teacher.eval()
    student.eval()
    agree = torch.zeros((), dtype=torch.int64, device=s_dev)
    kl_sum = torch.zeros((), dtype=torch.float64, device=s_dev)
    total = 0
    budget = min((b for b in (batch_token_budget(teacher), batch_token_budget(student)) if b), default=None)
    batches = eval_batches([len(f["input_ids"]) for f in split.features], batch_size, budget)
    for rows in tqdm(batches, desc="agreement", disable=not progress, leave=False):
        batch = collate([split[i] for i in rows])
        select = answer_positions(batch["labels"])
        t_chunks = answer_logit_chunks(teacher, batch["input_ids"].to(t_dev), batch["attention_mask"].to(t_dev),
                                       select.to(t_dev), vocab_size)
        s_chunks = answer_logit_chunks(student, batch["input_ids"].to(s_dev), batch["attention_mask"].to(s_dev),
                                       select.to(s_dev), vocab_size)
        for (_, t), (_, s) in zip(t_chunks, s_chunks):
            t = t.to(s_dev)
            agree += (t.argmax(-1) == s.argmax(-1)).sum()
            log_p = torch.log_softmax(t, -1)
            del t
            kl_sum += (log_p.exp() * (log_p - torch.log_softmax(s, -1))).sum().double()
            total += s.shape[0]
    return {"top1_agreement": int(agree) / max(1, total), "kl": float(kl_sum) / max(1, total), "tokens": total}


# -- efficiency -----------------------------------------------------------------------------------------------------

def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


@torch.no_grad()
def efficiency(model: torch.nn.Module, tokenizer, prompt: str = "Question: What is 12 times 7?\nAnswer:", *,
               new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 16), repeats: int = 2) -> dict:
    """Size, memory and generation speed of one model on its current device.

    Greedy generation of exactly `new_tokens` tokens (EOS ignored) after `prompt`, at each batch size;
    the best of `repeats` timed runs after one warm-up. Reports parameters (total and without the
    input embeddings), size on disk, weights in memory, the peak memory of the batch-16 generation
    above the weights, latency per generated token at batch 1 and tokens/s at each batch size.
    """
    from .models import memory_footprint

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
        model.generate(**enc, **kwargs)  # warm-up
        best = math.inf
        with PeakMemory(device) as peak:
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model.generate(**enc, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
        out[f"tokens_per_s_batch{bs}"] = bs * new_tokens / best
        out[f"peak_memory_batch{bs}"] = peak.bytes
        if bs == 1:
            out["latency_ms_per_token"] = 1000 * best / new_tokens
    return out


def evaluate_model(label: str, model: torch.nn.Module, tokenizer, eval_split: TokenizedSplit, eval_cfg, *,
                   system_prompt: Optional[str] = None, teacher: Optional[torch.nn.Module] = None,
                   gsm_shots: Sequence[Example] = (), mmlu_examples: Optional[Sequence[Example]] = None,
                   progress: bool = True) -> dict:
    """One results row: perplexity, GSM accuracy, MMLU, agreement with `teacher`, efficiency.

    What runs follows `eval_cfg` (generate_samples, agreement, efficiency) and the inputs given
    (`mmlu_examples`, `teacher`). Per-question rows are kept under "generations" and "mmlu_rows"
    (left out of the table, saved by the pipeline).
    """
    ppl = perplexity(model, eval_split, pad_token_id=tokenizer.pad_token_id, batch_size=eval_cfg.batch_size,
                     vocab_size=len(tokenizer), desc=f"{label}: perplexity", progress=progress)
    row = {"model": label, "parameters": count_parameters(model), "perplexity": ppl["perplexity"],
           "answer_tokens": ppl["tokens"]}
    if eval_cfg.generate_samples > 0:
        acc = gsm8k_accuracy(model, tokenizer, eval_split.examples[:eval_cfg.generate_samples],
                             system_prompt=system_prompt, max_new_tokens=eval_cfg.max_new_tokens,
                             batch_size=eval_cfg.batch_size, shots=gsm_shots, desc=f"{label}: GSM8K",
                             progress=progress)
        row.update(accuracy=acc["accuracy"], correct=acc["correct"], questions=acc["total"],
                   ci95_low=acc["ci95"][0], ci95_high=acc["ci95"][1], generation_s=acc["seconds"],
                   decoding="greedy" + (" (overrode the model's " + ", ".join(
                       f"{k}={v}" for k, v in acc["overridden"].items()) + ")" if acc["overridden"] else ""),
                   generations=acc["rows"])
    if mmlu_examples:
        mmlu = mmlu_accuracy(model, tokenizer, mmlu_examples, shots=eval_cfg.mmlu_shots,
                             batch_size=eval_cfg.batch_size, desc=f"{label}: MMLU", progress=progress)
        row.update(mmlu=mmlu["accuracy"], mmlu_macro=mmlu["macro"], mmlu_questions=mmlu["total"],
                   mmlu_ci95_low=mmlu["ci95"][0], mmlu_ci95_high=mmlu["ci95"][1], mmlu_s=mmlu["seconds"],
                   mmlu_per_subject=mmlu["per_subject"], mmlu_rows=mmlu["rows"])
    if teacher is not None and teacher is not model and getattr(eval_cfg, "agreement", False):
        agree = agreement(teacher, model, eval_split, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                          batch_size=eval_cfg.batch_size, progress=progress)
        row.update(top1_agreement=agree["top1_agreement"], kl_to_teacher=agree["kl"])
    if getattr(eval_cfg, "efficiency", False):
        eff = efficiency(model, tokenizer)
        row.update(parameters_no_embeddings=eff["parameters_no_embeddings"], size_mb=eff["size_on_disk"] / 1e6,
                   latency_ms_per_token=eff["latency_ms_per_token"], tokens_per_s_b1=eff["tokens_per_s_batch1"],
                   tokens_per_s_b16=eff["tokens_per_s_batch16"],
                   peak_memory_mb_b16=None if eff["peak_memory_batch16"] is None else eff["peak_memory_batch16"] / 1e6)
    return row


DETAIL_KEYS = ("generations", "mmlu_rows", "mmlu_per_subject")  # per-question data, kept out of tables


def results_table(rows: Sequence[dict]):
    """A pandas DataFrame of the results rows (per-question details left out), one model per row."""
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if k not in DETAIL_KEYS} for r in rows]).set_index("model")
    for column in ("parameters", "parameters_no_embeddings"):
        if column in table:
            table[column] = (table[column] / 1e6).round(1)
    return table.rename(columns={"parameters": "params (M)", "parameters_no_embeddings": "params w/o emb. (M)"})


def results_markdown(rows: Sequence[dict]) -> str:
    """The headline figures as a markdown table: accuracies with their 95% intervals."""
    lines = ["| model | params (M) | perplexity | GSM accuracy (95% CI) | MMLU (95% CI) | top-1 agreement | "
             "latency ms/token | tokens/s (batch 16) |", "|" + " --- |" * 8]

    def pct(r: dict, key: str, low: str, high: str, extra: str = "") -> str:
        if r.get(key) is None:
            return "-"
        return f"{100 * r[key]:.1f}% ({100 * r[low]:.1f}-{100 * r[high]:.1f}){extra}"

    for r in rows:
        gsm = pct(r, "accuracy", "ci95_low", "ci95_high", f", {r.get('correct')}/{r.get('questions')}")
        mmlu = pct(r, "mmlu", "mmlu_ci95_low", "mmlu_ci95_high", f", n={r.get('mmlu_questions')}")
        agree = "-" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.1f}%"
        lat = "-" if r.get("latency_ms_per_token") is None else f"{r['latency_ms_per_token']:.1f}"
        tps = "-" if r.get("tokens_per_s_b16") is None else f"{r['tokens_per_s_b16']:.0f}"
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f} | {r['perplexity']:,.2f} | {gsm} | {mmlu} | "
                     f"{agree} | {lat} | {tps} |")
    return "\n".join(lines)


def side_by_side(examples: Sequence[Example], answers: dict[str, Sequence[str]]):
    """A DataFrame with each question, its gold answer, and each model's answer."""
    import pandas as pd

    data = {"question": [e.question for e in examples], "gold": [e.answer for e in examples]}
    data.update({name: list(texts) for name, texts in answers.items()})
    return pd.DataFrame(data)
