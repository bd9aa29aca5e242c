"""Evaluation: answer-token perplexity, GSM8K accuracy by batched greedy generation, results table."""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data import Example, PaddingCollator, TokenizedSplit, answers_match, extract_gsm8k_answer, format_prompt
from .models import answer_logits, answer_positions, count_parameters


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: torch.nn.Module, split: TokenizedSplit, *, pad_token_id: int, batch_size: int = 16,
               desc: str = "perplexity", progress: bool = True) -> dict:
    """exp(mean NLL) over answer tokens only (prompt and padding never count).

    Returns {"perplexity", "nll", "tokens"}.
    """
    model.eval()
    collate = PaddingCollator(pad_token_id, "right")
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(split)), key=lambda i: len(split[i]["input_ids"]))  # less padding
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        batch = collate([split[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        select = answer_positions(batch["labels"])
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], select).float()
        targets = batch["labels"][:, 1:][select[:, :-1]]
        total_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        total_tokens += targets.numel()
    nll = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 192,
             batch_size: int = 16, desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy completions of `prompts` (already formatted), batched with left padding, in input order.

    Each sequence stops at the tokenizer's EOS (the end of the answer) or after `max_new_tokens`.
    """
    model.eval()
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[Optional[str]] = [None] * len(prompts)
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            index = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text.strip()
    finally:
        tokenizer.padding_side = saved_side
    return outputs  # type: ignore[return-value]


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
                   desc: str = "GSM8K", progress: bool = True) -> dict:
    """Exact-match accuracy of the final number, with a 95% interval and every row for inspection."""
    prompts = [format_prompt(tokenizer, e.question, system_prompt) for e in examples]
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    rows = []
    for example, output in zip(examples, outputs):
        predicted = extract_gsm8k_answer(output)
        rows.append({"where": example.where, "question": example.question, "output": output,
                     "extracted": predicted, "gold": example.answer, "correct": answers_match(predicted, example.answer)})
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows))
    return {"accuracy": correct / max(len(rows), 1), "correct": correct, "total": len(rows), "ci95": (low, high),
            "seconds": seconds, "rows": rows}


def evaluate_model(label: str, model: torch.nn.Module, tokenizer, eval_split: TokenizedSplit, eval_cfg, *,
                   system_prompt: Optional[str] = None, progress: bool = True) -> dict:
    """Perplexity and (if eval_cfg.generate_samples > 0) GSM accuracy of one model: one results row."""
    ppl = perplexity(model, eval_split, pad_token_id=tokenizer.pad_token_id, batch_size=eval_cfg.batch_size,
                     desc=f"{label}: perplexity", progress=progress)
    row = {"model": label, "parameters": count_parameters(model), "perplexity": ppl["perplexity"],
           "answer_tokens": ppl["tokens"]}
    if eval_cfg.generate_samples > 0:
        acc = gsm8k_accuracy(model, tokenizer, eval_split.examples[:eval_cfg.generate_samples],
                             system_prompt=system_prompt, max_new_tokens=eval_cfg.max_new_tokens,
                             batch_size=eval_cfg.batch_size, desc=f"{label}: GSM8K", progress=progress)
        row.update(accuracy=acc["accuracy"], correct=acc["correct"], questions=acc["total"],
                   ci95_low=acc["ci95"][0], ci95_high=acc["ci95"][1], generation_s=acc["seconds"],
                   generations=acc["rows"])
    return row


def results_table(rows: Sequence[dict]):
    """A pandas DataFrame of the results rows (generations left out), one model per row."""
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if k != "generations"} for r in rows]).set_index("model")
    if "parameters" in table:
        table["parameters"] = (table["parameters"] / 1e6).round(1)
        table = table.rename(columns={"parameters": "params (M)"})
    return table


def side_by_side(examples: Sequence[Example], answers: dict[str, Sequence[str]]):
    """A DataFrame with each question, its gold answer, and each model's answer."""
    import pandas as pd

    data = {"question": [e.question for e in examples], "gold": [e.answer for e in examples]}
    data.update({name: list(texts) for name, texts in answers.items()})
    return pd.DataFrame(data)
