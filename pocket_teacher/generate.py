"""Text the models write: batched greedy decoding, and the teacher's answers to the training questions
(sequence-level distillation), cached as readable JSONL.

    answers = generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=256))
    kept, report = generate_answers(teacher, tokenizer, examples, "runs/teacher_cache", cfg.generate, keep="correct")

`generate_answers` is sequence-level distillation: the teacher answers the training questions, optionally keeping
only answers whose final number is correct (rejection sampling); the answers are cached under a fingerprint of the
teacher, the questions, the template and the generation settings, and reused on a match.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .batches import AnswerBatch, length_batches
from .config import GenerateConfig
from .data import (DataError, Example, PaddingCollator, answers_match, extract_gsm8k_answer, format_prompt,
                   text_example)
from .files import digest, fingerprint, model_digest, write_text
from .progress import tqdm

FORMAT = 1  # bump when the answers file's layout changes


# Greedy decoding, spelled out: transformers fills every knob left unset from the model's own generation config
# (Qwen2.5-Instruct ships do_sample=True, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05), so each
# knob that changes the argmax path is set here to its neutral value.
GREEDY = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None,
          "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
          "length_penalty": 1.0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
          "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
          "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
          "exponential_decay_length_penalty": None}


def overridden_generation_settings(model: torch.nn.Module) -> dict:
    """The model's own generation-config values that greedy decoding here overrides (reported with results)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    out = {}
    for key, neutral in GREEDY.items():
        value = getattr(config, key, None)
        sampling_only = key in ("temperature", "top_p", "top_k", "min_p", "typical_p")
        if value is not None and value != neutral and not (sampling_only and not config.do_sample):
            out[key] = value  # do_sample=True included: its neutral value is False
    return out


class RealVocabulary:
    """Output-layer rows beyond the tokenizer's `size` (padding to a multiple of 64 or 128, as Qwen and Llama
    checkpoints have) get -inf: neither greedy decoding nor sampling can pick an id the tokenizer does not have, and
    sampled rollouts follow the distribution over the real vocabulary that the losses use."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.size:
            scores = scores.clone()
            scores[..., self.size:] = float("-inf")
        return scores


def real_vocabulary(model: torch.nn.Module, size: Optional[int]) -> list:
    """[RealVocabulary(size)] when the model's output layer is wider than `size`, else []."""
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    return [RealVocabulary(size)] if size and rows and rows > size else []


class NucleusSampling:
    """Temperature, then nucleus (top-p) filtering: the distribution transformers' TemperatureLogitsWarper and
    TopPLogitsWarper give (a token is kept when the probability of the tokens more likely than it is under top_p;
    the most likely token always is), without sorting the whole vocabulary at every step. The nucleus is looked for
    among the `candidates` most likely tokens (one top-k); only rows whose nucleus is larger than that fall back to
    the full sort. On a 49k vocabulary that sort was a third of the teacher's sampling time on CPU."""

    def __init__(self, temperature: float, top_p: float = 1.0, candidates: int = 256):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"NucleusSampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p >= 1.0:
            return scores
        out, found = self._nucleus(scores, min(self.candidates, scores.shape[-1]))
        wide = (~found).nonzero().flatten()  # rows whose nucleus reaches past the candidates: the whole vocabulary
        if len(wide):
            out[wide] = self._nucleus(scores[wide], scores.shape[-1])[0]
        return out

    def _nucleus(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores outside the nucleus set to -inf, looking among the k likeliest tokens; and, per row, whether those
        k tokens hold the whole nucleus (their probability reaches top_p)."""
        top, index = scores.topk(k, dim=-1)  # descending
        probs = (top - scores.logsumexp(-1, keepdim=True)).exp()
        above = probs.cumsum(-1) - probs  # probability of the tokens more likely than each
        kept = top.masked_fill(above >= self.top_p, -float("inf"))
        return torch.full_like(scores, -float("inf")).scatter_(-1, index, kept), probs.sum(-1) >= self.top_p


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], settings: Optional[GenerateConfig] = None,
             *, stop: Sequence[str] = (), desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy completions of `prompts` (already formatted), batched with left padding, in input order.

    `settings` (a `GenerateConfig`; default: greedy, 256 new tokens, batches of 8) gives the budget (max_new_tokens),
    the batch size and the sampling (temperature, top_p, seed); `stop` is given here as a list (`default_stop`
    resolves generate.stop for a tokenizer).

    Greedy means greedy: no sampling, no repetition penalty, no n-gram blocking, whatever the model's own generation
    config says (`GREEDY`; `overridden_generation_settings` lists what was overridden). Each sequence stops at the
    tokenizer's EOS (the end of the answer), at any of the `stop` strings (e.g. "\\nQuestion:" for plain few-shot
    prompts; cut from the output), or after `max_new_tokens`. Prompts are sorted by length so a batch carries little
    padding. With `temperature` > 0 it samples instead (nucleus `top_p`, no top-k), each batch from its own generator
    state seeded by `seed` and the batch's first prompt index (the global RNG is left as it was), so a run is
    reproducible."""
    g = settings or GenerateConfig()
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"generate: prompts {empty[:5]} are empty; a model continues at least one token of text, "
                         f"so give each prompt some (free text: its opening words).")
    model.eval()
    device = next(model.parameters()).device
    outputs: list[Optional[str]] = [None] * len(prompts)
    # Sampling: temperature and nucleus filtering by NucleusSampling (the same distribution as transformers' warpers,
    # a third faster on CPU), so the generation config itself leaves the logits alone.
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if g.temperature > 0 else {}
    processors = real_vocabulary(model, len(tokenizer))
    processors += [NucleusSampling(g.temperature, g.top_p)] if g.temperature > 0 else []
    config = GenerationConfig(**{**GREEDY, **sampling}, max_new_tokens=g.max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              **({"stop_strings": list(stop)} if stop else {}))
    batches = length_batches([len(p) for p in prompts], g.batch_size)  # similar lengths together: little padding
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for index in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(g.seed * 1_000_003 + index[0])
                out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList(processors),
                                     **({"tokenizer": tokenizer} if stop else {}))
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True)):
                for marker in stop:  # the stop string itself is not part of the answer
                    text = text.split(marker)[0]
                outputs[i] = text.strip()
    finally:
        tokenizer.padding_side = saved_side
    return outputs  # type: ignore[return-value]


@dataclass
class GenerationReport:
    """What the teacher's generated answers gave (printed by the notebook)."""

    path: str
    status: str  # "generated" or "reused"
    rows: int
    kept: int
    rejected: dict = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    what: str = "teacher answers"

    def __str__(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.rejected.items()) or "none"
        return f"{self.what} {self.status}: kept {self.kept} of {self.rows} (rejected: {why}) in {self.path}"


def _read_rows(path: Path, fields: Sequence[str], what: str) -> Optional[list[dict]]:
    """The cached rows of a JSONL file, or None when absent; a damaged file (a truncated line, a missing field) is
    named, removed and generated again, never a raw JSONDecodeError. Lines are split at "\\n" only: generated text
    may hold U+2028 and other characters that str.splitlines() also breaks at."""
    if not path.is_file():
        return None
    rows = []
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not set(fields) <= set(row):
                    raise ValueError(f"line {number} lacks {' / '.join(fields)}")
                rows.append(row)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        print(f"{what}: {path} is damaged ({str(exc).splitlines()[0]}); removing it and generating the {what} again")
        path.unlink(missing_ok=True)
        return None
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as JSONL, renamed into place once whole."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows), after=f"{path.name} was not written; free space "
               f"there and run again (the cache is written only when complete, so nothing half-done is reused).")


def default_stop(tokenizer, stop: Optional[Sequence[str]] = None) -> list[str]:
    """The stop strings to use: `stop` when given; else, for a base model (no chat template), "\\nQuestion:", where
    such a model starts inventing the next question of its own training target."""
    if stop is not None:
        return list(stop)
    return [] if getattr(tokenizer, "chat_template", None) else ["\nQuestion:"]


def answers_path(teacher: torch.nn.Module, tokenizer, examples: Sequence[Example], root: str | Path,
                 settings: GenerateConfig, system_prompt: Optional[str] = None,
                 teacher_key: Optional[dict] = None) -> Path:
    """Where `generate_answers` keeps the teacher's answers to `examples`: named by a fingerprint of the teacher,
    the questions, the template and the generation settings."""
    template = getattr(tokenizer, "chat_template", None) or ""
    parts = {"format": FORMAT, "teacher": {"weights": model_digest(teacher), **(teacher_key or {})},
             "data": digest(*(json.dumps([e.question, e.answer]).encode() for e in examples)),
             "template": digest(template.encode()), "system_prompt": system_prompt,
             "max_new_tokens": settings.max_new_tokens}
    stops = default_stop(tokenizer, settings.stop)
    if settings.temperature > 0:  # keys only when set, so greedy answers cached before keep their fingerprint
        parts["sampling"] = {"temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                             "batch_size": settings.batch_size}
    if stops:
        parts["stop"] = stops
    return Path(root) / f"answers-{fingerprint(parts)}.jsonl"


def generate_answers(teacher: torch.nn.Module, tokenizer, examples: Sequence[Example], root: str | Path,
                     settings: GenerateConfig, *, keep: str = "all", system_prompt: Optional[str] = None,
                     teacher_key: Optional[dict] = None,
                     progress: bool = True) -> tuple[list[Example], GenerationReport]:
    """The teacher answers every question (batched, greedy or sampled as `settings` say: the generate.* knobs);
    its answers become the targets.

    keep: "all" keeps every answer; "correct" keeps only answers whose extracted final number equals
    the example's gold answer (rejection sampling), counting the rest by reason. Works whatever the
    student's tokenizer, since the answers are text. Cached as ``<root>/answers-<fingerprint>.jsonl``
    (one JSON object per question, the file renamed into place when whole) and reused on a match."""
    if keep not in ("all", "correct"):
        raise ValueError(f"keep={keep!r}: use 'all' or 'correct' (rejection sampling on the final answer).")
    stops = default_stop(tokenizer, settings.stop)
    path = answers_path(teacher, tokenizer, examples, root, settings, system_prompt, teacher_key)
    start, status = time.perf_counter(), "reused"
    rows = _read_rows(path, ("question", "teacher_answer", "extracted"), "teacher answers")
    if rows is not None and (len(rows) != len(examples)
                             or any(r["question"] != e.question for r, e in zip(rows, examples))):
        print(f"teacher answers: {path} does not match these questions; generating them again")
        rows = None
    if rows is None:
        status = "generated"
        prompts = [format_prompt(tokenizer, e.question, system_prompt) for e in examples]
        outputs = generate(teacher, tokenizer, prompts, settings, stop=stops, desc="teacher answers",
                           progress=progress)
        rows = [{"question": e.question, "gold": e.answer, "teacher_answer": out,
                 "extracted": extract_gsm8k_answer(out), "where": e.where} for e, out in zip(examples, outputs)]
        _write_rows(path, rows)
    kept, rejected = [], {}
    for e, r in zip(examples, rows):
        answer = r["teacher_answer"].strip()
        reason = None
        if not answer:
            reason = "empty answer"
        elif keep == "correct" and r["extracted"] is None:
            reason = "no final number"
        elif keep == "correct" and not answers_match(r["extracted"], e.answer):
            reason = "wrong final number"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        kept.append(replace(e, target=answer, where=f"{e.where} (teacher answer)"))
    return kept, GenerationReport(str(path), status, len(examples), len(kept), rejected, time.perf_counter() - start)


# -- free text the teacher writes ------------------------------------------------------------------------------------

SEED_PROMPTS = (
    "The history of the printing press", "How a bicycle works", "Once upon a time, in a small village,",
    "The water cycle begins when", "A good recipe for bread starts with", "The first rule of saving money is",
    "Photosynthesis is the process by which", "The city woke up early that morning.", "Volcanoes form when",
    "Learning a new language is easier if", "The rules of chess are simple:", "In the year 1900, most people",
    "Why the sky is blue:", "A letter to a friend who moved away:", "The best way to learn to program is",
    "Honey bees live in colonies that", "How to plant a tree:", "The moon has phases because",
    "A short story about a lost dog:", "Electric cars differ from petrol cars in that",
    "The human heart pumps blood", "Ancient Rome was founded", "Tips for a good night's sleep:",
    "The ocean covers most of the Earth and")


def read_prompts(path: Optional[str]) -> list[str]:
    """Prompts for teacher-written text: one per non-empty line of `path`, or the built-in SEED_PROMPTS."""
    if path is None:
        return list(SEED_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"generate.prompts={path}: no such file; give a text file with one prompt per line, or "
                        f"null for the built-in seed prompts.")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not prompts:
        raise DataError(f"generate.prompts={path} holds no prompt (only blank lines).")
    return prompts


def texts_path(teacher: torch.nn.Module, tokenizer, prompts: Sequence[str], root: str | Path, settings: GenerateConfig,
               teacher_key: Optional[dict] = None) -> Path:
    """Where `generate_texts` keeps the teacher's texts: named by a fingerprint of the teacher, the prompts and the
    settings."""
    g, stops = settings, default_stop(tokenizer, settings.stop)
    parts = {"format": FORMAT, "teacher": {"weights": model_digest(teacher), **(teacher_key or {})},
             "prompts": digest(*(p.encode() for p in prompts)), "num_samples": g.num_samples,
             "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "stop": stops,
             "seed": g.seed}
    if g.temperature > 0:  # each batch samples from its own seeded generator: the batching shapes the texts
        parts["batch_size"] = g.batch_size
    return Path(root) / f"texts-{fingerprint(parts)}.jsonl"


def generate_texts(teacher: torch.nn.Module, tokenizer, prompts: Sequence[str], root: str | Path,
                   settings: GenerateConfig, *, teacher_key: Optional[dict] = None,
                   progress: bool = True) -> tuple[list[Example], GenerationReport]:
    """`settings.num_samples` texts written by the teacher, continuing `prompts` in turn (raw text, no chat
    template), sampled at `settings.temperature` / `top_p` (greedy at 0), cut at EOS or a stop string. Cached as
    readable JSONL (``texts-<fingerprint>.jsonl``: prompt, text) under a fingerprint of the teacher, prompts and
    settings, and reused on a match. Empty texts are dropped and counted in the report. Each Example's question is
    its prompt and its target the continuation (trained on as one text)."""
    g, stops = settings, default_stop(tokenizer, settings.stop)
    path = texts_path(teacher, tokenizer, prompts, root, settings, teacher_key)
    start, status = time.perf_counter(), "reused"
    rows = _read_rows(path, ("prompt", "text"), "teacher texts")
    if rows is not None and len(rows) != g.num_samples:
        print(f"teacher texts: {path} holds {len(rows)} texts, not {g.num_samples}; writing them again")
        rows = None
    if rows is None:
        status = "generated"
        chosen = [prompts[i % len(prompts)] for i in range(g.num_samples)]
        outputs = generate(teacher, tokenizer, chosen, settings, stop=stops, desc="teacher texts", progress=progress)
        rows = [{"prompt": p, "text": o} for p, o in zip(chosen, outputs)]
        _write_rows(path, rows)
    kept = [text_example(" " + r["text"], f"{path.name}:{i + 1}", prompt=r["prompt"])
            for i, r in enumerate(rows) if r["text"].strip()]
    rejected = {"empty text": len(rows) - len(kept)} if len(kept) < len(rows) else {}
    return kept, GenerationReport(str(path), status, len(rows), len(kept), rejected, time.perf_counter() - start,
                                  what="teacher texts")


# -- on-policy distillation: the student's own answers ------------------------------------------------------------

@dataclass
class Rollouts:
    """The student's sampled answers to a batch's prompts, as a training batch (prompt labels -100, the sampled
    tokens as labels), with what was sampled."""

    batch: AnswerBatch  # the same rows, right-padded, the sampled tokens as answer tokens
    lengths: list[int]  # sampled tokens per row (the EOS included when it was reached)
    finished: int  # rows that reached EOS within the budget


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Tokens before each row's first label (the prompt), from a right-padded training batch."""
    answer = (labels != -100) & attention_mask.bool()
    return torch.where(answer.any(1), answer.float().argmax(1), attention_mask.sum(1)).tolist()


@torch.no_grad()
def sample_rollouts(model: torch.nn.Module, batch: AnswerBatch, *, pad_token_id: int, eos_token_id, seed: int,
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                    vocab_size: Optional[int] = None) -> Rollouts:
    """Sample the model's answers to the prompts of a right-padded training `batch` (batched, KV cache, no
    gradient), stopping each at EOS or after `max_new_tokens`.

    The sampler's randomness is a pure function of `seed` (its own generator state, forked from the global one,
    which is left untouched), so a run resumed from a checkpoint samples exactly what the uninterrupted run did.
    Sampling is plain ancestral sampling at `temperature` with nucleus `top_p`: no top-k, no repetition penalty,
    whatever the model's generation config says; ids at or beyond `vocab_size` (a padded output layer) are never
    drawn."""
    device = batch.input_ids.device
    starts = [max(n, 1) for n in prompt_lengths(batch.labels, batch.attention_mask)]  # free text: 1 token
    prompts = [batch.input_ids[i, :n].tolist() for i, n in enumerate(starts)]
    left = PaddingCollator(pad_token_id, "left")([{"input_ids": p} for p in prompts])
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    config = GenerationConfig(**{**GREEDY, "do_sample": True, "temperature": temperature, "top_p": top_p,
                                 "top_k": 0}, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                              eos_token_id=eos or None, use_cache=True)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=left["input_ids"].to(device),
                                 attention_mask=left["attention_mask"].to(device), generation_config=config,
                                 logits_processor=LogitsProcessorList(real_vocabulary(model, vocab_size)))
    finally:
        model.train(was_training)
    new = out[:, left["input_ids"].shape[1]:].tolist()
    features, lengths, finished = [], [], 0
    for prompt, tokens in zip(prompts, new):
        stop = next((j for j, t in enumerate(tokens) if t in eos), None)
        tokens = tokens[:stop + 1] if stop is not None else tokens
        finished += stop is not None
        lengths.append(len(tokens))
        features.append({"input_ids": prompt + tokens, "labels": [-100] * len(prompt) + tokens})
    right = PaddingCollator(pad_token_id, "right")(features)
    return Rollouts(AnswerBatch.of(right, batch.rows).to(device), lengths, finished)
