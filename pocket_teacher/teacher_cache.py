"""The teacher, run once: a top-k cache of its log-probs.

    cache = build_topk_cache(teacher, train_split, "runs/teacher_cache", k=64, vocab_size=len(tokenizer))
    print(cache.report)          # top-k mass captured, KL(full || top-k), size per token
    distill(student, None, train_split, cfg, teacher_cache=cache, ...)   # no teacher forward

The top-k cache keeps, for every answer token of the split, the teacher's k most likely next tokens (int32 ids), their
log-probs at T = 1 (fp16) and the leftover tail mass (fp32), in flat memory-mapped files. It lives in a folder named by
a fingerprint of everything that determines its content (teacher weights and precision, data, chat template, max length,
vocabulary, k): a matching cache is reused, any change builds a new one. It is written into ``<fingerprint>.partial/``
with a progress record after every batch, so a build killed midway resumes there, and only a finished, checksummed build
is renamed into place; a cache whose files do not match their checksums is never read. Under torchrun / accelerate
launch (``share=Share.current()``) every process computes a share of the batches into the same files and process 0
publishes the joined cache: the bytes of a one-process build.

The teacher's generated answers (sequence-level distillation) are a stage of their own: `generate.py`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batches import (AnswerBatch, AnswerBatches, AnswerHidden, answer_logit_chunks, hidden_logit_chunks,
                      split_answer_counts)
from .data import TokenizedSplit
from .files import digest, file_hash, fingerprint, model_digest, require_free_space, write_json
from .models import output_layer
from .losses import TAIL_FLOOR, TeacherTopK, kl
from .progress import tqdm

FORMAT = 1  # bump when the on-disk layout changes: old caches then get new fingerprints
FILES = {"ids": np.int32, "logprobs": np.float16, "tail": np.float32}


class CacheError(RuntimeError):
    """A teacher cache cannot be used for this split (it is rebuilt, or the caller is told why)."""


# -- fingerprints -------------------------------------------------------------------------------------

def splitdigest(split: TokenizedSplit) -> dict[str, str]:
    """Content hashes of a tokenized split: the example texts, and the token ids with their masks."""
    text = digest(*(json.dumps([e.question, e.target]).encode() for e in split.examples))
    tokens = digest(*(np.asarray(f["input_ids"], np.int64).tobytes() + b"|" +
                       np.asarray(f["labels"], np.int64).tobytes() + b";" for f in split.features))
    return {"data": text, "tokens": tokens}


def fingerprint_parts(teacher: torch.nn.Module, split: TokenizedSplit, k: int, vocab_size: int,
                      teacher_key: Optional[dict] = None) -> dict:
    """Everything the cache content depends on; `teacher_key` adds e.g. the source id and precision."""
    return {"format": FORMAT, "teacher": {"weights": model_digest(teacher), **(teacher_key or {})},
            **splitdigest(split), "template": digest(split.template.encode()), "max_length": split.max_length,
            "vocab_size": vocab_size, "k": k}


# -- the cache -----------------------------------------------------------------------------------------

@dataclass
class CacheReport:
    """What a cache holds and how faithful it is (printed by the notebook)."""

    path: str
    fingerprint: str
    status: str  # "built", "resumed after N rows", or "reused"
    rows: int
    tokens: int
    k: int
    bytes: int
    mass_mean: float  # mean teacher probability inside the top-k over all cached tokens
    mass_p05: float  # 5th percentile of that mass (the hardest tokens)
    kl_sample: float  # mean KL(full teacher || top-k + uniform tail) in nats/token, on the sampled rows
    kl_sample_tokens: int  # tokens that KL was measured on
    build_seconds: float
    # The two objectives at temperature T, on the same sampled tokens: {"T": {"kl": KL(live || cached target) over
    # the K + 1 buckets, "tail_live": the tail's mass in the full tempered distribution, "tail_cached": in the
    # tempered buckets}} (means per token), for TEMPERATURES and the training temperature.
    at_temperature: dict = field(default_factory=dict)
    temperature: Optional[float] = None  # the training temperature the fidelity line reports

    def __str__(self) -> str:
        line = (f"teacher cache {self.status}: {self.rows} rows, {self.tokens:,} answer tokens, top-{self.k}, "
                f"{self.bytes / 2**20:.1f} MiB ({self.bytes / max(1, self.tokens):.0f} B/token) in {self.path}\n"
                f"fidelity: top-{self.k} mass mean {self.mass_mean:.4f} (5th percentile {self.mass_p05:.4f}); "
                f"KL(full || top-{self.k}) {self.kl_sample:.4f} nats/token on {self.kl_sample_tokens:,} tokens")
        t = self.temperature
        if t is None or t == 1.0:
            return line
        got = self.at_temperature.get(_tkey(t))
        if got is None:
            measured = ", ".join(sorted(self.at_temperature, key=float))
            return line + (f"\nat the training temperature T={t:g}: not measured (when this cache was built: "
                           + (f"T = {measured})" if measured else "by an earlier version; delete the folder to "
                              "measure it)"))
        return line + (f"\nat the training temperature T={t:g} the two objectives differ: the live teacher's target "
                       f"(the full vocabulary tempered) gives the tail {got['tail_live']:.1%} of the mass, the "
                       f"cache's (K + 1 buckets tempered) {got['tail_cached']:.1%}; KL(live || cached target) over the "
                       f"buckets {got['kl']:.4f} nats/token")


TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0)  # where a build measures the two objectives, besides the training one


@dataclass(frozen=True)
class Fidelity:
    """Where a cache build measures its fidelity: KL(full teacher || top-k) and the two objectives (`CacheReport`)
    on the batches that start within the first `rows` rows, at `TEMPERATURES` and the training `temperature`."""

    rows: int = 32
    temperature: float = 1.0


def _tkey(t: float) -> str:
    return f"{float(t):g}"


class TopKCache:
    """Read access to a finished cache: the teacher's top-k for given rows of the split."""

    def __init__(self, path: Path, meta: dict, report: CacheReport):
        self.path, self.meta, self.report, self.k = path, meta, report, meta["k"]
        self.offsets = np.load(path / "offsets.npy")
        self._files = []  # ids, logprobs, tail (a loop, not a comprehension: one frame fewer on the training path)
        for name in FILES:
            self._files.append(_open(path, name, int(self.offsets[-1]), self.k, "r"))

    @classmethod
    def open(cls, path: Path) -> "TopKCache":
        """A finished cache folder, with the report written when it was built."""
        meta = json.loads((path / "meta.json").read_text())
        return cls(path, meta, CacheReport(**{**meta["report"], "path": str(path)}))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, indices: Sequence[int], counts: Optional[Sequence[int]] = None,
             device: torch.device | str = "cpu") -> TeacherTopK:
        """The teacher's top-k signal for these split rows, concatenated in row order.

        `counts` (answer tokens per row in the batch) is checked against the cache, so a cache of
        another split or tokenization can never be paired with the wrong tokens."""
        spans = []
        for j, i in enumerate(int(x) for x in indices):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if counts is not None and int(counts[j]) != b - a:
                raise CacheError(f"teacher cache row {i} holds {b - a} answer tokens but the batch has "
                                 f"{int(counts[j])}: the cache belongs to another split; rebuild it.")
            spans.append(slice(a, b))
        ids, lp, tail = (np.concatenate(list(map(mm.__getitem__, spans))) for mm in self._files)  # no nested frame
        return TeacherTopK(torch.from_numpy(ids).long().to(device), torch.from_numpy(lp.astype(np.float32)).to(device),
                           torch.from_numpy(tail.copy()).to(device))


def _file_bytes(name: str, tokens: int, k: int) -> int:
    return tokens * (1 if name == "tail" else k) * np.dtype(FILES[name]).itemsize


def _open(folder: Path, name: str, tokens: int, k: int, mode: str) -> np.memmap:
    shape = (tokens,) if name == "tail" else (tokens, k)
    if tokens == 0:
        return np.zeros(shape, FILES[name])
    return np.memmap(folder / f"{name}.bin", dtype=FILES[name], mode=mode, shape=shape)


def built_share(teacher: torch.nn.Module, split: TokenizedSplit, root: str | Path, k: int, vocab_size: int,
                batch_size: int, teacher_key: Optional[dict] = None) -> tuple[float, Path]:
    """For the time plan, before a build: the share of `split`'s rows a cache of these settings already holds under
    `root`, and where. 1.0: a finished cache marked complete (its checksums are read only when it is reused). A
    partial build: the rows of the batches its progress files record that a resume at `batch_size` keeps (the
    same fingerprint, record format and token layout, a batch of the same rows; `_prepare` starts afresh
    otherwise). A guess from the records: the build checks every byte and recomputes what fails."""
    fp = fingerprint(fingerprint_parts(teacher, split, k, vocab_size, teacher_key))
    final, partial = Path(root) / fp, Path(root) / f"{fp}.partial"
    try:
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("complete") and meta.get("fingerprint") == fp:
            return 1.0, final
    except (OSError, ValueError):
        pass
    offsets, groups = _layout(split, batch_size)
    try:
        state, done, _, _ = _progress(partial)
        if (state["fingerprint"] != fp or state.get("format") != _PROGRESS
                or not np.array_equal(np.load(partial / "offsets.npy"), offsets)):
            return 0.0, final
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, final
    kept = sum(hi - lo for lo, hi in set(groups) & done.keys())
    return (min(1.0, kept / max(1, len(split))), partial) if kept else (0.0, final)


def validate_cache(path: Path, expected_fingerprint: Optional[str] = None) -> Optional[str]:
    """None if `path` is a complete, intact cache (with that fingerprint), else what is wrong with it."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "no meta.json (not a finished cache)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    if not meta.get("complete"):
        return "not marked complete"
    if expected_fingerprint and meta.get("fingerprint") != expected_fingerprint:
        return "fingerprint differs"
    tokens, k = meta["tokens"], meta["k"]
    for name in FILES:
        f = path / f"{name}.bin"
        want = _file_bytes(name, tokens, k)
        if tokens and (not f.is_file() or f.stat().st_size != want):
            return f"{f.name} has {f.stat().st_size if f.is_file() else 'no'} bytes, expected {want}"
        if tokens and file_hash(f) != meta["checksums"].get(name):
            return f"{f.name} does not match its checksum"
    offsets = path / "offsets.npy"
    if not offsets.is_file() or file_hash(offsets) != meta["checksums"].get("offsets"):
        return "offsets.npy missing or does not match its checksum"
    return None


@dataclass(frozen=True)
class Share:
    """The processes building one cache together: this one's `rank` of `size`, and how they wait for each other.

    Under `accelerate launch` / torchrun, `Share.current()` is the initialised process group: each process runs the
    teacher over its share of the batches, written into the same files, and process 0 joins the shares and
    publishes the cache, byte for byte the one a single process builds (the same batches, the same arithmetic).
    The default, one process alone, is what a caller that runs in one process only (e.g. on process 0) needs."""

    rank: int = 0
    size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @classmethod
    def current(cls) -> "Share":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), dist.barrier)
        return cls()


def shares(groups: Sequence[tuple[int, int]], cost: Sequence[int], size: int) -> list[list[tuple[int, int]]]:
    """`groups` (batches, in order) cut into `size` consecutive runs of about equal summed `cost` (padded tokens):
    the same cut in every process."""
    total, out, acc = sum(cost), [[] for _ in range(size)], 0
    for group, c in zip(groups, cost):
        rank = min(size - 1, int(size * (acc + c / 2) / max(1, total)))
        out[rank].append(group)
        acc += c
    return out


def build_topk_cache(teacher: torch.nn.Module, split: TokenizedSplit | AnswerHidden, root: str | Path, *,
                     k: int = 64, vocab_size: Optional[int] = None, batch_size: int = 8,
                     teacher_key: Optional[dict] = None, fidelity: Optional[Fidelity] = None, progress: bool = True,
                     share: Optional[Share] = None) -> TopKCache:
    """Reuse the matching cache under `root`, or run the teacher once over `split` and write it.

    One run builds a given cache at a time (a file lock; another run waits, then reuses it). Free space is
    checked and the files' blocks reserved before the teacher runs; every finished batch is checksummed, so
    a resumed build finds a damaged byte and computes that batch again. With `share` (`Share.current()` under
    torchrun / accelerate launch, every process calling), the processes build the batches between them, and the
    cache is byte for byte the one process's; a stopped build resumes with any number of processes.

    Args:
        teacher: the frozen teacher (any precision), on its device.
        split: the tokenized training split; row i of the cache is ``split[i]``. Rows are padded on the right,
            and causal attention never lets a padding token reach an answer position, so the pad id cannot change
            the cache (id 0 is used). Or the teacher's answer-position hidden states on a split, kept by an earlier
            pass over it (`batches.AnswerHidden`, e.g. the held-out agreement pass): the cache is then that split's,
            its logits rebuilt from them with the teacher's output layer alone, the decoder does not run (the same
            values up to float rounding: batch shapes).
        root: folder holding caches, one sub-folder per fingerprint.
        k: log-probs kept per answer token (ids int32, log-probs fp16: 6k + 4 bytes per token).
        vocab_size: the tokenizer's size; logits beyond it (padding rows) are dropped first.
        batch_size: rows per teacher forward (part of no fingerprint: each row's values do not depend on it beyond
            float rounding, and a build with a different batch size is a different build, not a resume).
        teacher_key: identifies the teacher beyond its weights (source, revision, precision).
        fidelity: where the report's fidelity is measured (`Fidelity`: the first 32 rows, the training temperature
            1 unless given).
        share: the processes building together (default: this one alone)."""
    hidden, split = (split, split.split) if isinstance(split, AnswerHidden) else (None, split)
    vocab = vocab_size or teacher.get_output_embeddings().weight.shape[0]
    if hidden is not None and (output_layer(teacher) is None or not hidden.serves(teacher, split)):
        raise ValueError("build_topk_cache: the hidden states were kept from another teacher (or a teacher whose "
                         "output layer is not exact); pass the split itself.")
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_cache.k={k}: use a value in [1, {vocab}] (the vocabulary size).")
    share, fidelity = share or Share(), fidelity or Fidelity()
    parts = fingerprint_parts(teacher, split, k, vocab, teacher_key)
    fp = fingerprint(parts)
    root = Path(root)
    build = _Build(root / f"{fp}.partial", root / fp, parts, k, vocab, batch_size, fidelity, fp)
    offsets, groups = _layout(split, batch_size)
    lock = cache_lock(root, fp, progress) if share.rank == 0 else None
    try:  # process 0 reuses a finished cache or prepares the partial build (joining what earlier processes did)
        if share.rank == 0:
            _prepare(build, offsets, split)
        share.barrier()
        if build.final.exists():  # prepared as reusable by process 0
            return _reused(build.final, fidelity)
        state = json.loads((build.partial / "progress.json").read_text())
        done = {tuple(r["rows"]) for r in state["batches"]}
        todo = [g for g in groups if g not in done]
        lengths = [len(f["input_ids"]) for f in split.features]
        mine = shares(todo, [(hi - lo) * max(lengths[lo:hi]) for lo, hi in todo], share.size)[share.rank]
        start = time.perf_counter()
        _compute(teacher, split, build, offsets, mine, share, progress=progress and share.rank == 0,
                 done_rows=sum(hi - lo for lo, hi in done), hidden=hidden)
        share.barrier()
        if share.rank == 0:  # process 0 joins the shares and publishes the cache
            state = _join(build, offsets)
            missing = [g for g in groups if g not in {tuple(r["rows"]) for r in state["batches"]}]
            if missing:
                raise CacheError(f"teacher cache: {len(missing)} batches of {build.partial} are missing after the "
                                 f"build (rows {missing[0][0]}- first); run again to compute them.")
            _publish(build, state, offsets, len(split), time.perf_counter() - start, share.size)
        share.barrier()
    finally:
        if lock is not None:
            lock.release()
    cache = TopKCache.open(build.final)
    cache.report = replace(cache.report, temperature=float(fidelity.temperature))
    return cache


def _reused(path: Path, fidelity: Fidelity) -> TopKCache:
    cache = TopKCache.open(path)
    cache.report = replace(cache.report, status="reused", temperature=float(fidelity.temperature))
    return cache


def cache_lock(root: Path, fp: str, progress: bool = True):
    """Hold ``<root>/<fingerprint>.lock`` (filelock) while one run builds a cache: a second run needing the
    same cache waits for it and then reuses it, instead of deleting the first one's partial files."""
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{fp}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            tqdm.write(f"teacher cache: another process is building {root / fp}; waiting for it to finish")
        lock.acquire()
    return lock


def _reserve(folder: Path, tokens: int, k: int) -> None:
    """Check the free space, then allocate the files' blocks for real (posix_fallocate): a memory-mapped file
    whose blocks the disk cannot supply kills the process with SIGBUS on first write, with no message."""
    fix = "Free space there, point teacher_cache.dir at a larger disk, or lower teacher_cache.k."
    require_free_space(folder, sum(_file_bytes(n, tokens, k) for n in FILES), "the teacher cache", fix, CacheError)
    for name in FILES:
        size = _file_bytes(name, tokens, k)
        with open(folder / f"{name}.bin", "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as exc:
                raise CacheError(f"Could not reserve {size / 2**20:,.1f} MiB for {folder / name}.bin: "
                                 f"{exc.strerror}. {fix}") from exc


def _batch_hash(*arrays) -> str:
    return digest(*(np.ascontiguousarray(a).tobytes() for a in arrays))


@dataclass(frozen=True)
class _Build:
    """One cache build: where it is written and published, and what it computes."""

    partial: Path
    final: Path
    parts: dict
    k: int
    vocab: int
    batch_size: int
    fidelity: Fidelity
    fingerprint: str


def _layout(split: TokenizedSplit, batch_size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Answer tokens' offsets per row (positions t whose next label is scored: labels from position 1 on that are
    not ignored), and the batches as (first row, end row): consecutive rows, the same in every process."""
    counts = np.array(split_answer_counts(split), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, _batches(len(split), batch_size)


def _batches(rows: int, batch_size: int) -> list[tuple[int, int]]:
    """The build's batches of `rows` rows as (first row, end row): consecutive rows, the same in every process."""
    return [(lo, min(lo + batch_size, rows)) for lo in range(0, rows, batch_size)]


def _prepare(build: _Build, offsets: np.ndarray, split) -> None:
    """Process 0, before anyone computes: a valid finished cache stays (to be reused); a stale one is removed; a
    partial build of this very cache keeps its intact batches (joined from every process's progress file),
    anything else starts afresh with preallocated files."""
    final, partial, fp = build.final, build.partial, build.fingerprint
    if final.exists() and validate_cache(final, fp) is None:
        return
    if final.exists():  # stale or damaged: never read, rebuilt from scratch
        shutil.rmtree(final)
    tokens = int(offsets[-1])
    try:  # a partial build of this very cache (none: FileNotFoundError) resumes where it stopped
        old = json.loads((partial / "progress.json").read_text())
        same = (old["fingerprint"] == fp and old.get("format") == _PROGRESS
                and np.array_equal(np.load(partial / "offsets.npy"), offsets))
    except (OSError, ValueError, KeyError):
        same = False
    if same:
        state = _join(build, offsets, rows=len(split))
        if state["batches"]:
            return
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "offsets.npy", offsets)
    if tokens:
        for name in FILES:  # preallocate the files at their final size
            _open(partial, name, tokens, build.k, "w+").flush()
        _reserve(partial, tokens, build.k)
    write_json(partial / "progress.json", {"fingerprint": fp, "format": _PROGRESS, "batches": [], "seconds": 0.0,
                                           "status": "built"})


_PROGRESS = 2  # the partial build's progress records: one per batch, from any process


def _progress(partial: Path) -> tuple[dict, dict, float, list[Path]]:
    """A partial build's joined progress.json, its batch records with every process's own since the last join
    (keyed by rows), the longest of those processes' wall times, and their files."""
    state = json.loads((partial / "progress.json").read_text())
    records = {tuple(r["rows"]): r for r in state["batches"]}
    extra = sorted(partial.glob("progress.*.json"))
    ran = 0.0  # the stopped build's wall time: its processes ran side by side
    for f in extra:
        try:
            got = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # a process killed while replacing its file: its batches are computed again
        records.update({tuple(r["rows"]): r for r in got["batches"]})
        ran = max(ran, got["seconds"])
    return state, records, ran, extra


def _join(build: _Build, offsets: np.ndarray, rows: Optional[int] = None) -> dict:
    """Process 0: every process's progress records joined into progress.json, each batch checked against its
    checksum (a damaged batch is dropped, to be computed again). With `rows` (at a resume) the status says how
    far the build had come."""
    partial, tokens = build.partial, int(offsets[-1])
    state, records, ran, extra = _progress(partial)
    mms = [_open(partial, name, tokens, build.k, "r") for name in FILES]
    good = []
    for (lo, hi), r in sorted(records.items()):
        a, b = int(offsets[lo]), int(offsets[hi])
        if _batch_hash(mms[0][a:b], mms[1][a:b], mms[2][a:b]) == r["hash"]:
            good.append(r)
    state["batches"] = good
    if rows is not None:  # at a resume: the stopped build's time counts; at the end, the caller's clock does
        state["seconds"] += ran
        groups = set(_batches(rows, build.batch_size))
        kept = sum(r["rows"][1] - r["rows"][0] for r in good if tuple(r["rows"]) in groups)  # what the resume skips
        status = f"resumed after {kept} of {rows} rows"
        damaged = len(good) < len(records)
        state["status"] = status + (" (damaged rows recomputed)" if damaged else "")
        if damaged:
            tqdm.write(f"teacher cache: {len(records) - len(good)} batches of the partial build in {partial} fail "
                       f"their checksum; computing them again")
    write_json(partial / "progress.json", state)
    for f in extra:
        f.unlink()
    return state


def _compute(teacher, split, build: _Build, offsets: np.ndarray, groups: list[tuple[int, int]], share: Share,
             progress: bool, done_rows: int, hidden: Optional[AnswerHidden] = None) -> None:
    """This process's batches: the teacher's top-k written into the shared files, each batch recorded with its
    checksum (and, within the fidelity rows, its fidelity sums) in progress.<rank>.json."""
    partial, k = build.partial, build.k
    mms = [_open(partial, name, int(offsets[-1]), k, "r+") for name in FILES]  # ids, logprobs, tail
    temperatures = [_tkey(t) for t in sorted({*TEMPERATURES, float(build.fidelity.temperature)})]
    mine = {"rank": share.rank, "batches": [], "seconds": 0.0, "rows_done": done_rows}
    teacher.eval()
    start = time.perf_counter()
    desc = "teacher cache" + (f" (share {share.rank + 1} of {share.size})" if share.size > 1 else "")
    bar = tqdm(total=done_rows + sum(hi - lo for lo, hi in groups), initial=done_rows, desc=desc,
               disable=not progress)
    batches = AnswerBatches(split, [list(range(lo, hi)) for lo, hi in groups], 0, next(teacher.parameters()).device)
    for batch in batches:
        lo, hi = batch.rows[0], batch.rows[-1] + 1
        a, b = int(offsets[lo]), int(offsets[hi])
        record = {"rows": [lo, hi]}
        if lo < build.fidelity.rows:
            record.update(kl_sum=0.0, kl_tokens=0, temperatures=temperatures, at_temperature={})
        if b > a:
            for mm, values in zip(mms, _teacher_topk(teacher, batch, build.vocab, k, record if "kl_sum" in record
                                                     else None, hidden)):
                mm[a:b] = values.cpu().numpy().astype(mm.dtype)
                mm.flush()
        record.pop("temperatures", None)
        record["hash"] = _batch_hash(*(mm[a:b] for mm in mms))
        mine["batches"].append(record)
        mine["rows_done"] += hi - lo
        write_json(partial / f"progress.{share.rank}.json", {**mine, "seconds": time.perf_counter() - start})
        bar.update(hi - lo)
    bar.close()
    del mms


def _teacher_topk(teacher, batch: AnswerBatch, vocab: int, k: int, kl_state: Optional[dict],
                  hidden: Optional[AnswerHidden] = None):
    """The teacher's top-k ids and log-probs and the leftover mass at a batch's answer positions, a chunk of
    tokens at a time (never the (N, V) logits of the whole batch); with `kl_state`, KL(full || top-k) is added;
    with `hidden`, the logits come from the kept hidden states through the output layer alone."""
    pieces = []
    with torch.no_grad():
        chunks = (answer_logit_chunks(teacher, batch.input_ids, batch.attention_mask, batch.select, vocab)
                  if hidden is None else hidden_logit_chunks(hidden.rows(batch.rows), output_layer(teacher), vocab))
        for _, logits in chunks:
            log_p = F.log_softmax(logits, dim=-1)
            del logits
            top_lp, top_ids = log_p.topk(k, dim=-1)
            tail = (1.0 - top_lp.double().exp().sum(-1)).clamp_min(0.0).float()
            if kl_state is not None:  # the approximation: the stored top-k, the tail spread uniformly
                width = log_p.shape[-1]
                approx = (torch.full_like(log_p, -math.inf) if k == width else
                          (tail.clamp_min(1e-30).log() - math.log(width - k)).unsqueeze(-1).expand_as(log_p).clone())
                approx.scatter_(-1, top_ids, top_lp.half().float())
                kl_state["kl_sum"] += float(kl(log_p, approx).clamp_min(0.0).sum())
                kl_state["kl_tokens"] += int(log_p.shape[0])
                for t in kl_state.get("temperatures", []):
                    sums = kl_state["at_temperature"].setdefault(t, {"kl": 0.0, "tail_live": 0.0, "tail_cached": 0.0})
                    for name, value in _objectives_at(log_p, top_ids, top_lp.half().float(), tail, float(t)).items():
                        sums[name] += value
            del log_p
            pieces.append((top_ids, top_lp, tail))
    return tuple(torch.cat(p) for p in zip(*pieces))


def _objectives_at(log_p: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor, tail: torch.Tensor,
                   t: float) -> dict[str, float]:
    """Summed over the tokens: the live loss's target at temperature t (the full distribution tempered) seen on the
    K + 1 buckets the cache's loss uses (the top-k, then the rest as one), against the cache's target (the stored
    top-k log-probs and tail mass tempered as K + 1 buckets, what `losses.topk_buckets` builds): their KL and the
    tail's mass in each. At t = 1 the two agree up to the fp16 rounding of the stored log-probs."""
    live = F.log_softmax(log_p / t, dim=-1)
    live_top = live.gather(-1, top_ids)
    if top_ids.shape[-1] == log_p.shape[-1]:  # the whole vocabulary: no tail bucket
        cached = F.log_softmax(top_lp / t, dim=-1)
        return {"kl": float(kl(live_top, cached).clamp_min(0.0).sum()), "tail_live": 0.0, "tail_cached": 0.0}
    live_tail = torch.logsumexp(live.scatter(-1, top_ids, -math.inf), -1, keepdim=True)
    cached = F.log_softmax(torch.cat([top_lp, tail.clamp_min(TAIL_FLOOR).log().unsqueeze(-1)], -1) / t, dim=-1)
    live_buckets = torch.cat([live_top, live_tail], -1)
    return {"kl": float(kl(live_buckets, cached).clamp_min(0.0).sum()),
            "tail_live": float(live_tail.exp().sum()), "tail_cached": float(cached[:, -1].exp().sum())}


def _publish(build: _Build, state: dict, offsets: np.ndarray, rows: int, seconds: float, processes: int) -> None:
    """Measure the finished partial build (fidelity sums in batch order, top-k mass, size), checksum it and rename
    it into place (atomic: the cache appears only once it is whole)."""
    partial, k, tokens = build.partial, build.k, int(offsets[-1])
    kl_sum, kl_tokens, sums = 0.0, 0, {}
    for r in state["batches"]:  # in batch order, whichever process computed them: the same float sums
        kl_sum, kl_tokens = kl_sum + r.get("kl_sum", 0.0), kl_tokens + r.get("kl_tokens", 0)
        for t, values in r.get("at_temperature", {}).items():
            total = sums.setdefault(t, dict.fromkeys(values, 0.0))
            for name, value in values.items():
                total[name] += value
    n = max(1, kl_tokens)
    mass = 1.0 - np.asarray(_open(partial, "tail", tokens, k, "r"), np.float64)
    status = state["status"] + (f" by {processes} processes" if processes > 1 else "")
    report = CacheReport(path=str(build.final), fingerprint=build.fingerprint, status=status, rows=rows,
                         tokens=tokens, k=k, bytes=sum((partial / f"{n}.bin").stat().st_size for n in FILES if tokens)
                         + (partial / "offsets.npy").stat().st_size,
                         mass_mean=float(mass.mean()) if tokens else 1.0,
                         mass_p05=float(np.percentile(mass, 5)) if tokens else 1.0, kl_sample=kl_sum / n,
                         kl_sample_tokens=kl_tokens, build_seconds=state["seconds"] + seconds,
                         at_temperature={t: {name: v / n for name, v in d.items()} for t, d in sums.items()})
    checksums = dict(zip(FILES, map(file_hash, (partial / f"{n}.bin" for n in FILES)))) if tokens else {}
    checksums["offsets"] = file_hash(partial / "offsets.npy")
    meta = {"complete": True, "fingerprint": build.fingerprint, "parts": build.parts, "k": k, "rows": rows,
            "tokens": tokens, "checksums": checksums, "report": asdict(report)}
    (partial / "progress.json").unlink()
    write_json(partial / "meta.json", meta)
    os.replace(partial, build.final)
