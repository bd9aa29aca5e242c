"""Data: GSM8K, MMLU and offline GSM-style problems in instruction format, tokenized for training.

Sources (each returns `Example`s and a `LoadReport` that counts what was skipped):

- ``load_gsm8k``: ``openai/gsm8k`` (config ``main``) from the Hub, or a local JSONL of the same schema;
- ``load_mmlu``: ``cais/mmlu`` (config ``all``) from the Hub, or a local JSONL of the same schema;
- ``load_gsm_symbolic``: GSM-Symbolic problems generated offline by ``reasoning-gym``, seeded.

Formatting goes through the student tokenizer's chat template (a plain template when it has
none); prompt tokens get label -100 so only answer tokens are learned and scored.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from .hub import HubUnavailableError, hub_offline, require_hub
from .versions import require

IGNORE_INDEX = -100
MMLU_LETTERS = "ABCD"
PLAIN_TEMPLATE = "{system}Question: {question}\nAnswer:"  # no trailing space: it starts the answer, as in lm-eval


class DataError(ValueError):
    """A data row or file is malformed; the message names the file, row and field, and the fix."""


@dataclass
class Example:
    """One instruction-format example."""

    question: str  # the user's message (for MMLU: question plus lettered choices)
    target: str  # what the student learns to write (worked solution, or the answer letter)
    answer: str  # gold final answer: a canonical number (GSM) or a letter A-D (MMLU)
    where: str  # provenance, e.g. "test.jsonl:12" or "gsm_symbolic(seed=2)#5"
    subject: Optional[str] = None  # MMLU subject
    stem: Optional[str] = None  # MMLU: the bare question, without the lettered choices
    choices: Optional[list[str]] = None  # MMLU: the four choices, in letter order
    reference: Optional[str] = None  # GSM8K: the answer as published (calculator notes kept), for lm-eval prompts


@dataclass
class LoadReport:
    """What a loader read, kept and skipped (nothing is dropped without being counted here)."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what else a reader should know (duplicates kept, ...)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.source}: {self.kept} of {self.rows} rows kept (skipped: {skipped}){notes}"


# -- answers -------------------------------------------------------------------------------------

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = re.compile(r"(?:(?<![\w)\]])-|−)?\s?\$?\s?(?:" + _NUMBER + r")")
_ANSWER_CUES = (
    re.compile(r"####\s*(.*)"),
    re.compile(r"\\boxed\{([^}]*)\}"),
    re.compile(r"answer\s*(?:is|:|=)\s*(.*)", re.IGNORECASE),
)


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of a number written as text: '1,234.00' -> '1234', '$-3.50' -> '-3.5'; None if none."""
    cleaned = text.replace(",", "").replace("$", "").replace("−", "-").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [v for m in _SIGNED.finditer(text) if (v := normalize_number(m.group(0))) is not None]


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The final number of a GSM8K reference or a model's output, canonicalised; None if there is none.

    Looks, in order, after the last ``####``, inside ``\\boxed{}``, after "answer is/:", then takes
    the last number in the text. Commas, currency signs and trailing zeros are removed:
    ``"#### 72"`` -> ``"72"``, ``"The answer is 1,234."`` -> ``"1234"``, ``"$18"`` -> ``"18"``."""
    if not text:
        return None
    for cue in _ANSWER_CUES:
        for match in reversed(list(cue.finditer(text))):
            numbers = _numbers(match.group(1))
            if numbers:
                return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def answers_match(predicted: Optional[str], gold: str) -> bool:
    """Exact numeric match of two canonical answers (None never matches)."""
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return predicted.strip() == gold.strip()


# -- row validation ------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _require_str(row: dict, key: str, where: str, fix: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (row has {sorted(row)}). {fix}")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}. {fix}")
    return value


def gsm8k_example(row: dict, where: str) -> Example:
    """Validate one GSM8K row (`question`, `answer` ending in `#### <number>`) into an Example.

    The `<<48/2=24>>` calculator annotations of the original data are removed from the target."""
    fix = "GSM8K rows need {'question': str, 'answer': '... #### <number>'}."
    question = _require_str(row, "question", where, fix)
    reference = _require_str(row, "answer", where, fix)
    if "####" not in reference:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' final line: {reference[-60:]!r}. {fix}")
    final = reference.rsplit("####", 1)[1].strip()
    gold = normalize_number(final)
    if gold is None:
        raise DataError(f"{where}: field 'answer' ends with '#### {final}', which is not a number. {fix}")
    body = _CALCULATOR.sub("", reference.rsplit("####", 1)[0]).rstrip()
    return Example(question=question.strip(), target=f"{body}\n#### {gold}", answer=gold, where=where,
                   reference=reference)


def format_mmlu_question(question: str, choices: Sequence[str]) -> str:
    lines = [question.strip(), ""] + [f"{MMLU_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice."])


def mmlu_example(row: dict, where: str) -> Example:
    """Validate one MMLU row (`question`, `subject`, `choices`: 4 strings, `answer`: 0-3)."""
    fix = "MMLU rows need {'question': str, 'subject': str, 'choices': [4 strings], 'answer': 0-3}."
    question = _require_str(row, "question", where, fix)
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of 4 strings, got {choices!r}. {fix}")
    answer = row.get("answer")
    if isinstance(answer, str) and answer in MMLU_LETTERS:
        answer = MMLU_LETTERS.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
        raise DataError(f"{where}: field 'answer' must be an integer 0-3 (or a letter A-D), got {answer!r}. {fix}")
    letter = MMLU_LETTERS[answer]
    return Example(question=format_mmlu_question(question, choices), target=letter, answer=letter,
                   where=where, subject=row.get("subject"), stem=question.strip(), choices=list(choices))


def _validated(rows: Iterable[tuple[str, Any]], make, report: LoadReport, bad_rows: str,
               limit: Optional[int]) -> list[Example]:
    examples = []
    for where, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        report.rows += 1
        try:
            if isinstance(row, _BadJson):
                raise DataError(f"{row} Fix the line or set data.bad_rows=skip.")
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
            examples.append(make(row, where))
        except DataError:
            if bad_rows == "error":
                raise
            report.skip(getattr(row, "reason", "malformed"))
    report.kept = len(examples)
    return examples


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", parsed row) for each non-empty line.

    A line that is not UTF-8 or not JSON comes out as a `_BadJson` naming the file, line and byte or
    column, so validation raises a DataError (or counts a skip with data.bad_rows=skip). A missing path, a
    folder and an empty file each raise their own DataError."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        raise DataError(f"{path} is a folder, not a JSONL file. Give the file itself"
                        + (f", e.g. {path / inside[0]}" if inside else "") + ".")
    if not path.is_file():
        raise DataError(f"{path}: no such file. Give the path of a JSONL file (one JSON object per line)"
                        + ("" if path.is_absolute() else f"; relative paths start from {Path.cwd()}") + ".")
    seen = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path.name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                seen += 1
                yield where, _BadJson(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                      f"{exc.start + 1}); save the file as UTF-8.", reason="not UTF-8")
                continue
            if not line.strip():
                continue
            seen += 1
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, _BadJson(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).")
    if seen == 0:
        raise DataError(f"{path} is empty (no rows). Give a JSONL file with one JSON object per line.")


class _BadJson(str):
    """Placeholder for an unreadable line; validation turns it into a DataError (or a counted skip)."""

    def __new__(cls, text: str, reason: str = "malformed"):
        obj = super().__new__(cls, text)
        obj.reason = reason
        return obj


_HUB_FIX = "Pass a local JSONL of the same schema (data.train_path / data.eval_path) or use data.source=gsm_symbolic."


def _rows(path: Optional[str], repo: str, config: str, split: str,
          fix: str = _HUB_FIX) -> tuple[Iterator[tuple[str, Any]], str]:
    """Rows from a local JSONL, or from the Hub (offline mode: the datasets cache only; else a fast probe first);
    `fix` names the settings that give a local file instead."""
    if path:
        return read_jsonl(path), f"local file {path}"
    name = f"Dataset {repo} ({config}, {split})"
    if not hub_offline():
        require_hub(name, fix)
    require("datasets", f"loading {name}")
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:
        if hub_offline():  # offline mode and not in the datasets cache
            raise HubUnavailableError(f"{name} is not in the local cache and offline mode is on. {fix}") from exc
        raise DataError(f"Could not load {name} from the Hub: {exc}. {fix}") from exc
    return ((f"{repo}[{split}]#{i}", row) for i, row in enumerate(ds)), f"Hub dataset {repo} ({config}, {split})"


def load_gsm8k(split: str = "test", path: Optional[str] = None, limit: Optional[int] = None,
               bad_rows: str = "error") -> tuple[list[Example], LoadReport]:
    """GSM8K rows as Examples, from a local JSONL (`path`) or the Hub's openai/gsm8k."""
    rows, source = _rows(path, "openai/gsm8k", "main", split)
    report = LoadReport(source=f"GSM8K {split} from {source}")
    return _validated(rows, gsm8k_example, report, bad_rows, limit), report


def load_mmlu(split: str = "test", path: Optional[str] = None, subjects: Optional[Sequence[str]] = None,
              limit: Optional[int] = None, bad_rows: str = "error", fix: str = _HUB_FIX,
              seed: int = 0) -> tuple[list[Example], LoadReport]:
    """MMLU rows as Examples, from a local JSONL (`path`) or the Hub's cais/mmlu (config `all`); `fix` is the
    advice when the Hub cannot be read (the settings of the caller's own source). `limit` rows are a sample
    stratified by subject (`stratified_sample`, seeded), not the first rows: MMLU files are sorted by subject."""
    rows, source = _rows(path, "cais/mmlu", "all", split, fix)
    if subjects is not None:
        wanted = set(subjects)
        rows = ((w, r) for w, r in rows if not isinstance(r, dict) or r.get("subject") in wanted)
    report = LoadReport(source=f"MMLU {split} from {source}")
    examples = _validated(rows, mmlu_example, report, bad_rows, None)
    if limit is not None and limit < len(examples):
        examples = stratified_sample(examples, limit, seed)
        groups = len({e.subject for e in examples})
        report.notes.append(f"{limit} of them scored: a sample stratified by subject ({groups} subjects, each in "
                            f"proportion to its rows, seed {seed})")
    return examples, report


def hold_out_prompts(texts: Sequence[Example], eval_size: int,
                     seed: int) -> tuple[list[Example], list[Example], str]:
    """Teacher-written texts split so that no held-out text's prompt appears in training: whole prompts (drawn in a
    seeded order) are held out until they hold at least `eval_size` texts. Held-out perplexity then scores only
    tokens the student never trained on (free text scores every token, its prompt included); a random split of
    texts would score prompts seen many times in training. Returns (train, held out, a note on the split)."""
    by_prompt: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        by_prompt.setdefault(text.question, []).append(i)
    prompts = sorted(by_prompt)
    random.Random(seed).shuffle(prompts)
    held: list[str] = []
    while prompts[len(held):] and sum(len(by_prompt[p]) for p in held) < eval_size:
        held.append(prompts[len(held)])
    if len(held) == len(prompts):
        raise DataError(f"The teacher wrote {len(texts)} texts on {len(prompts)} prompt(s); holding out whole prompts "
                        f"until data.eval_size={eval_size} texts are held out leaves none for training. Give more "
                        f"prompts (generate.prompts), raise generate.num_samples, or lower data.eval_size.")
    out = {i for p in held for i in by_prompt[p]}
    order = [i for i in range(len(texts)) if i not in out]
    random.Random(seed).shuffle(order)  # a data.train_size cut takes texts of every training prompt
    train = [texts[i] for i in order]
    held_out = [texts[i] for i in sorted(out)]
    note = (f"{len(held_out)} held out: every text of {len(held)} of the {len(prompts)} prompts, none of them in "
            f"training")
    return train, held_out, note


def stratified_sample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """`n` examples drawn in proportion to each subject's share (largest remainders; every subject gets one while
    `n` allows), a seeded random choice inside each subject, returned in file order."""
    n = min(n, len(examples))
    groups: dict[Optional[str], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.subject, []).append(i)
    names = sorted(groups, key=str)
    exact = {s: n * len(groups[s]) / len(examples) for s in names}
    take = {s: min(len(groups[s]), max(int(exact[s]), 1 if n >= len(names) else 0)) for s in names}
    while sum(take.values()) > n:  # the one per subject overshot: trim where the most was given beyond the share
        take[max((s for s in names if take[s] > 1), key=lambda s: (take[s] - exact[s], str(s)))] -= 1
    while sum(take.values()) < n:  # the largest remainder of the share not yet given, one row at a time
        take[max((s for s in names if take[s] < len(groups[s])), key=lambda s: (exact[s] - take[s], str(s)))] += 1
    rng = random.Random(seed)
    picked = sorted(i for s in names for i in rng.sample(groups[s], take[s]))
    return [examples[i] for i in picked]


def load_gsm_symbolic(size: int, seed: int) -> tuple[list[Example], LoadReport]:
    """GSM-Symbolic problems generated offline by reasoning-gym (`gsm_symbolic`), deterministic in `seed`.

    The target is the generator's worked solution, ending with `#### <answer>`."""
    require("reasoning-gym", "data.source=gsm_symbolic")
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    report = LoadReport(source=f"gsm_symbolic (reasoning-gym, seed={seed}, offline)")

    def make(item: dict, where: str) -> Example:
        gold = normalize_number(str(item.get("answer", "")))
        if gold is None:
            raise DataError(f"{where}: generated answer {item.get('answer')!r} is not a number.")
        solution = (item.get("metadata") or {}).get("answer_cot") or ""
        body = solution.rsplit("####", 1)[0].rstrip() if "####" in solution else solution.rstrip()
        return Example(question=item["question"].strip(), target=f"{body}\n#### {gold}".lstrip(), answer=gold,
                       where=where)

    rows = ((f"gsm_symbolic(seed={seed})#{i}", item) for i, item in enumerate(dataset))
    return _validated(rows, make, report, "skip", None), report


# -- free text -----------------------------------------------------------------------------------------------------

def text_example(text: str, where: str, prompt: str = "") -> Example:
    """Free text as an Example: every token is a target (`prompt`, when the text continues one, is kept apart
    for side-by-side generation but trained on too)."""
    return Example(question=prompt, target=text, answer="", where=where)


def read_text_rows(path: str, column: str = "text", bad_rows: str = "error",
                   report: Optional[LoadReport] = None) -> list[Example]:
    """Paragraphs of free text from a .txt file (blank lines separate them), a JSONL file (the `column` field of
    each row) or a Hub dataset id (``name`` or ``name:config``, its train split's `column`). Empty paragraphs are
    skipped and counted; a row without a string `column` is named by file and line (or skipped and counted with
    data.bad_rows=skip)."""
    report = report if report is not None else LoadReport(source=f"text from {path}")
    p = Path(path)
    if p.suffix == ".txt" or (p.exists() and p.suffix != ".jsonl"):
        if not p.is_file():
            raise DataError(f"{p}: no such text file. Give a .txt file (paragraphs separated by blank lines), a "
                            f"JSONL file with a {column!r} field, or a Hub dataset id.")
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = p.read_bytes()[:exc.start].count(b"\n") + 1
            raise DataError(f"{p.name}:{line}: not valid UTF-8 (byte at offset {exc.start}); save the file as "
                            f"UTF-8.") from None
        out, lines, start = [], [], 1
        for number, line in enumerate(raw.split("\n") + [""], start=1):  # a paragraph ends at a blank line
            if line.strip():
                start = number if not lines else start
                lines.append(line)
            elif lines:
                report.rows += 1
                out.append(text_example("\n".join(lines).strip(), f"{p.name}:{start}"))
                lines = []
        report.kept = len(out)
        if not out:
            raise DataError(f"{p} holds no text (only blank lines).")
        return out
    if p.suffix == ".jsonl" or p.exists():
        rows = read_jsonl(p)
    else:  # a Hub dataset id: its train split
        dataset, _, config = path.partition(":")
        require_hub(f"the text dataset {dataset!r}", "give data.train_path as a local .txt or .jsonl file instead")
        require("datasets", f"loading the text dataset {dataset!r}")
        import datasets

        data = datasets.load_dataset(dataset, config or None, split="train")
        rows = ((f"{path}#{i}", dict(row)) for i, row in enumerate(data))

    def make(row: dict, where: str) -> Example:
        value = row.get(column)
        if not isinstance(value, str):
            raise DataError(f"{where}: no string field {column!r} (fields: {', '.join(row) or 'none'}). Set "
                            f"data.text_column to the field that holds the text.")
        if not value.strip():
            raise DataError(f"{where}: field {column!r} is empty.")
        return text_example(value.strip(), where)
    return _validated(rows, make, report, bad_rows, None)


def load_examples(data_cfg, split: str) -> tuple[list[Example], LoadReport]:
    """Examples for `split` ("train" or "eval") as the DataConfig says."""
    train = split == "train"
    size = data_cfg.train_size if train else data_cfg.eval_size
    if data_cfg.source == "text":
        return load_text_split(data_cfg, split)
    if data_cfg.source == "gsm_symbolic":
        return load_gsm_symbolic(size, data_cfg.train_seed if train else data_cfg.eval_seed)
    path = data_cfg.train_path if train else data_cfg.eval_path
    if data_cfg.source == "gsm8k":
        return load_gsm8k("train" if train else "test", path, size, data_cfg.bad_rows)
    return load_mmlu("validation" if train else "test", path, None, size, data_cfg.bad_rows)


def load_text_split(data_cfg, split: str) -> tuple[list[Example], LoadReport]:
    """Free text (data.source=text): data.train_path's paragraphs; the held-out split is data.eval_path's, or,
    without one, the last data.eval_size paragraphs of data.train_path after a seeded shuffle (never in training)."""
    if not data_cfg.train_path:
        raise DataError("data.source=text needs data.train_path: a .txt file, a JSONL file with a text field, or a "
                        "Hub dataset id.")
    path = data_cfg.eval_path if split == "eval" and data_cfg.eval_path else data_cfg.train_path
    report = LoadReport(source=f"text ({split}) from {path}")
    rows = read_text_rows(path, data_cfg.text_column, data_cfg.bad_rows, report)
    if not data_cfg.eval_path:
        order = list(range(len(rows)))
        random.Random(data_cfg.train_seed).shuffle(order)
        if len(rows) <= data_cfg.eval_size:
            raise DataError(f"{path}: {len(rows)} paragraphs, not more than data.eval_size={data_cfg.eval_size}; "
                            f"lower data.eval_size or give data.eval_path.")
        held = set(order[-data_cfg.eval_size:])
        chosen = [rows[i] for i in order if (i in held) == (split == "eval")]
        report.notes.append(f"{'held out' if split == 'eval' else 'kept for training'}: {len(chosen)} of "
                            f"{len(rows)} paragraphs (seeded split, data.train_seed)")
        rows = chosen
    rows = rows[:data_cfg.train_size if split == "train" else data_cfg.eval_size]
    report.kept = len(rows)
    return rows, report


def handle_duplicates(examples: list[Example], report: LoadReport, policy: str = "keep") -> list[Example]:
    """Count rows repeated within a split (same question and target) in `report`; drop the repeats with
    policy "drop" (the first of each is kept), keep them with "keep". Nothing goes unreported."""
    seen, out, repeats = set(), [], 0
    for e in examples:
        key = (e.question, e.target)
        if key in seen:
            repeats += 1
            if policy == "drop":
                continue
        seen.add(key)
        out.append(e)
    if repeats:
        report.notes.append(f"{repeats} duplicate row(s) " + ("dropped" if policy == "drop" else
                                                             "kept (data.duplicates=drop removes them)"))
        if policy == "drop":
            report.skip("duplicate", repeats)
    report.kept = len(out) if policy == "drop" else report.kept
    return out


def remove_overlap(train: list[Example], held_out: Sequence[Example], report: LoadReport) -> list[Example]:
    """Training examples whose question is not in `held_out` (generators can repeat a problem
    across seeds); each removal is counted in `report`."""
    key = (lambda e: e.question or e.target)  # free text has no question: the text itself
    held = {key(e) for e in held_out}
    kept = [e for e in train if key(e) not in held]
    if len(kept) < len(train):
        report.skip("also in the held-out split", len(train) - len(kept))
    report.kept = len(kept)
    return kept


# -- formatting and tokenization ------------------------------------------------------------------

def format_prompt(tokenizer, question: str, system_prompt: Optional[str] = None,
                  shots: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt text up to where the assistant's answer starts.

    Uses the tokenizer's chat template with a generation prompt; a tokenizer without one gets
    ``PLAIN_TEMPLATE`` ("Question: ...\\nAnswer:", the space before the answer belonging to the answer, so the
    prompt never ends in a lone space token, as in lm-evaluation-harness). `shots` are (question, answer) pairs shown first
    as earlier turns of the conversation (few-shot prompting)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = f"{system_prompt}\n\n" if system_prompt else ""
    earlier = "".join(PLAIN_TEMPLATE.format(system="", question=q) + " " + a + "\n\n" for q, a in shots)
    return system + earlier + PLAIN_TEMPLATE.format(system="", question=question)


def end_of_answer(tokenizer) -> str:
    """The text that closes an answer: the tokenizer's EOS token (e.g. SmolLM's <|im_end|>)."""
    return tokenizer.eos_token or ""


@dataclass
class TokenizedSplit:
    """Tokenized examples (input_ids / labels lists) and the report of what was kept."""

    features: list[dict[str, list[int]]]
    examples: list[Example]
    report: LoadReport
    max_length: int = 0  # the length limit the split was tokenized with
    template: str = ""  # the prompt format used (chat template or PLAIN_TEMPLATE, plus the system prompt)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.features[index], "index": index}  # the row index finds its teacher-cache entry

    @property
    def answer_tokens(self) -> int:
        return sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in self.features)


def encode_example(tokenizer, example: Example, system_prompt: Optional[str] = None) -> dict[str, list[int]]:
    """input_ids = prompt + target + EOS; labels = -100 over the prompt, the token ids over the answer.
    Free text (no gold answer) is trained on all its tokens: its prompt, if any, then the text, then EOS."""
    if not example.answer:
        text = (example.question + example.target) + end_of_answer(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}
    prompt_ids = tokenizer(format_prompt(tokenizer, example.question, system_prompt),
                           add_special_tokens=False)["input_ids"]
    lead = "" if getattr(tokenizer, "chat_template", None) else " "  # the plain template ends at "Answer:"
    target_ids = tokenizer(lead + example.target + end_of_answer(tokenizer), add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int, overlong: str = "skip",
                      system_prompt: Optional[str] = None, report: Optional[LoadReport] = None) -> TokenizedSplit:
    """Tokenize with the student's tokenizer, masking prompts; apply the over-long policy and count it.

    overlong: "skip" drops rows longer than `max_length` (counted in the report), "truncate" cuts
    the answer to fit (counted; rows whose prompt alone is too long are skipped), "error" raises."""
    report = report or LoadReport(source="examples", rows=len(examples))
    features, kept = [], []
    for example in examples:
        feature = encode_example(tokenizer, example, system_prompt)
        n = len(feature["input_ids"])
        if n > max_length:
            if overlong == "error":
                raise DataError(f"{example.where}: {n} tokens is longer than data.max_length={max_length}. "
                                f"Raise data.max_length, or set data.overlong=skip or truncate.")
            if overlong == "truncate" and feature["labels"].count(IGNORE_INDEX) < max_length - 1:  # the prompt fits
                feature = {k: v[:max_length] for k, v in feature.items()}
                report.skip(f"truncated to {max_length} tokens (kept)")
            else:
                report.skip(f"longer than {max_length} tokens")
                continue
        features.append(feature)
        kept.append(example)
    report.kept = len(features)
    if not features:
        raise DataError(f"{report.source}: no rows left after tokenization ({report}). "
                        f"Raise data.max_length or give more rows.")
    template = (getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE) + f"|system={system_prompt!r}"
    return TokenizedSplit(features=features, examples=kept, report=report, max_length=max_length, template=template)


class PaddingCollator:
    """Pads a list of features into tensors: input_ids, attention_mask, labels (-100 on padding)."""

    def __init__(self, pad_token_id: int, side: str = "right"):
        if side not in ("right", "left"):
            raise ValueError(f"side={side!r}: use 'right' (training) or 'left' (generation).")
        self.pad_token_id, self.side = pad_token_id, side

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            labels = f.get("labels", [IGNORE_INDEX] * n)
            parts = {"input_ids": (list(f["input_ids"]), self.pad_token_id),
                     "attention_mask": ([1] * n, 0), "labels": (list(labels), IGNORE_INDEX)}
            for key, (values, fill) in parts.items():
                batch[key].append(values + [fill] * pad if self.side == "right" else [fill] * pad + values)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if all("index" in f for f in features):
            out["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return out
