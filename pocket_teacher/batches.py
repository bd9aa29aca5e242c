"""The answer batch: padded rows of a tokenized split, where their answer tokens are, and what a model says there.

The one seam between tokenized data and the models. Training, perplexity, agreement, the teacher cache and
on-policy scoring all walk a split through `answer_batches` (or build one `answer_batch`) and run a model on a
batch with `answer_logits`, `answer_hidden` or `answer_logit_chunks`, never the full (B, L, V) logits.

    for batch in answer_batches(split, tokenizer.pad_token_id, batch_size=8):
        logits = answer_logits(model, batch.input_ids, batch.attention_mask, batch.select)  # (N, V)
        nll = F.cross_entropy(logits, batch.targets)
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, PaddingCollator, TokenizedSplit
from .models import output_layer


def answer_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, L) bool mask of the positions t whose next label (t + 1) is scored; the causal shift."""
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != ignore_index
    return select


@dataclass
class AnswerBatch:
    """Rows of a split padded on the right, with their answer positions and the tokens those predict."""

    rows: list[int]  # the split rows, in batch order
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 on prompt and padding
    select: torch.Tensor  # (B, L) bool: positions whose next token is an answer token (`answer_positions`)
    targets: torch.Tensor  # (N,) the answer tokens the selected positions predict, in row order

    @classmethod
    def of(cls, padded: dict, rows: Sequence[int]) -> "AnswerBatch":
        """From a collated dict (input_ids, attention_mask, labels), e.g. `PaddingCollator`'s output."""
        labels = padded["labels"]
        select = answer_positions(labels)
        return cls(list(rows), padded["input_ids"], padded["attention_mask"], labels, select,
                   labels[:, 1:][select[:, :-1]])

    @property
    def answer_counts(self) -> list[int]:  # answer tokens per row
        return self.select.sum(1).tolist()

    def to(self, device: torch.device | str) -> "AnswerBatch":
        return AnswerBatch(self.rows, *(x.to(device) for x in (self.input_ids, self.attention_mask, self.labels,
                                                               self.select, self.targets)))


def answer_batch(split: TokenizedSplit, rows: Sequence[int], pad_token_id: int,
                 device: Optional[torch.device | str] = None) -> AnswerBatch:
    """Split rows `rows`, padded on the right (as training pads them), on `device`."""
    batch = AnswerBatch.of(PaddingCollator(pad_token_id, "right")(list(map(split.features.__getitem__, rows))), rows)
    return batch if device is None else batch.to(device)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: Optional[int] = None) -> list[list[int]]:
    """Row indices in batches of similar length (sorted, so little padding): at most `batch_size` rows and, with
    `max_tokens`, at most that many padded tokens per batch (a memory budget; a longer row goes alone)."""
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # row i is the longest so far
        if current and (len(current) >= batch_size or (max_tokens and lengths[i] * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


class AnswerBatches:
    """The batches of one pass over a split: iterate for `AnswerBatch`es (built one at a time), `len` for their
    number (progress bars)."""

    def __init__(self, split: TokenizedSplit, groups: list[list[int]], pad_token_id: int, device=None):
        self.split, self.groups, self.pad_token_id, self.device = split, groups, pad_token_id, device

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[AnswerBatch]:  # each batch built when it is reached
        return map(functools.partial(answer_batch, self.split, pad_token_id=self.pad_token_id, device=self.device),
                   self.groups)


def answer_batches(split: TokenizedSplit, pad_token_id: int, *, batch_size: int, rows: Optional[Sequence[int]] = None,
                   by_length: bool = False, max_tokens: Optional[int] = None,
                   device: Optional[torch.device | str] = None) -> AnswerBatches:
    """The one iterator over a split: its rows (or `rows`) as answer batches of at most `batch_size` rows on
    `device`, consecutive rows in order or, `by_length`, rows of similar length together with at most
    `max_tokens` padded tokens per batch (evaluation, where order does not matter and padding costs)."""
    rows = list(range(len(split))) if rows is None else list(rows)
    if by_length:
        lengths = [len(split.features[r]["input_ids"]) for r in rows]
        groups = [[rows[i] for i in group] for group in length_batches(lengths, batch_size, max_tokens)]
    else:
        groups = [rows[lo:lo + batch_size] for lo in range(0, len(rows), batch_size)]
    return AnswerBatches(split, groups, pad_token_id, device)


# -- what a model says at the answer positions, without the full (B, L, V) logits ---------------------------------

def answer_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  select: torch.Tensor) -> torch.Tensor:
    """``(N, V)`` logits at the N positions where `select` is True, without the full (B, L, V) tensor.

    Runs the decoder, then the output layer only on the selected hidden states (prompt and padding
    positions, often half the tokens, never reach the vocabulary projection). Models whose logits
    are more than ``lm_head(hidden)`` (e.g. final soft-capping) take the full forward instead.
    """
    if getattr(model.config, "final_logit_softcapping", None):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[select]
    return model.get_output_embeddings()(answer_hidden(model, input_ids, attention_mask, select))


def answer_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  select: torch.Tensor) -> torch.Tensor:
    """``(N, H)`` final hidden states (after the final norm) at the N positions where `select` is True."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[select]


def auto_chunk_size(vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk of logits (the chunked loss, perplexity, agreement, the cache), by device and vocabulary.

    CPU: one chunk's (C, V) fp32 logits hold about 32 MiB (caches stay warm; measured fastest here).
    CUDA: about 512 MiB of fp32 logits but at least 1,024 tokens, in multiples of 256, so the output-layer
    matmuls keep the GPU busy (1,024 tokens at Qwen's 151,665-token vocabulary, 2,560 at SmolLM2's 49,152).
    The loss's own memory is about six such (C, V) buffers; `pocket_teacher.plan` counts them."""
    if device_type == "cuda":
        return max(1024, ((1 << 27) // max(1, vocab_size)) // 256 * 256)
    return max(8, (1 << 23) // max(1, vocab_size))


def answer_logit_chunks(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        select: torch.Tensor, vocab_size: Optional[int] = None, chunk_size: Optional[int] = None):
    """Yield ``(start, logits)``: fp32 logits of the selected positions ``start:start + C``, on the model's device.

    The output layer runs a chunk of C tokens at a time (`auto_chunk_size` by default), so at most a (C, V) block
    of logits exists at once, never the (N, V) logits of the whole batch. `vocab_size` keeps the first V logits
    (rows an output layer pads on are dropped). Models whose logits are more than ``hidden @ W.T + b``
    (soft-capping, scaling) fall back to `answer_logits`, sliced the same way."""
    layer = output_layer(model)
    if layer is not None:  # the hidden states, through the output layer a chunk at a time
        return hidden_logit_chunks(answer_hidden(model, input_ids, attention_mask, select), layer, vocab_size,
                                   chunk_size)
    rows = answer_logits(model, input_ids, attention_mask, select)  # the full forward's logits, sliced
    vocab = vocab_size or rows.shape[-1]
    chunk = chunk_size or auto_chunk_size(vocab, rows.device.type)
    return ((i, rows[i:i + chunk, :vocab].float()) for i in range(0, rows.shape[0], chunk))


def hidden_logit_chunks(hidden: torch.Tensor, layer: tuple[torch.Tensor, Optional[torch.Tensor]],
                        vocab_size: Optional[int] = None, chunk_size: Optional[int] = None):
    """`answer_logit_chunks` from final hidden states already computed (``(N, H)``, e.g. `AnswerHidden.rows`) and a
    model's exact output layer ``(weight, bias)`` (`models.output_layer`): the same logits, on the weight's device."""
    weight, bias = layer
    vocab = vocab_size or weight.shape[0]
    w, b = weight[:vocab], None if bias is None else bias[:vocab]
    hidden = hidden.to(w.device)
    chunk = chunk_size or auto_chunk_size(vocab, w.device.type)
    for i in range(0, hidden.shape[0], chunk):
        yield i, F.linear(hidden[i:i + chunk].to(w.dtype), w, b).float()


def split_answer_counts(split: TokenizedSplit) -> list[int]:
    """Answer positions per row of a split (`answer_positions`: positions whose next label is scored); the
    teacher cache lays its rows out by them."""
    return [sum(1 for t in f["labels"][1:] if t != IGNORE_INDEX) for f in split.features]


def scored_tokens(split: TokenizedSplit) -> int:
    """The tokens a pass over the split scores: its answer positions (`split.answer_tokens` also counts a free
    text's first token, which no position predicts)."""
    return sum(split_answer_counts(split))


class AnswerHidden:
    """A frozen model's final hidden states at every answer position of a split, in split-row order, kept on the host.

    One pass of the teacher over the held-out split (section 5's agreement pass) keeps them; later stages that need
    the teacher's distributions on the same split (the held-out split's top-k cache, the trained students'
    agreement) rebuild its logits from them with its output layer alone (`hidden_logit_chunks`), instead of running
    the whole teacher again: ``N x H`` values (SmolLM2: 576 per token, 2.3 KB in fp32), where the logits would be
    ``N x V``. `serves` says whether they belong to this model and split (the same objects, the same answer tokens)."""

    def __init__(self, model: torch.nn.Module, split: TokenizedSplit, per_row: dict[int, torch.Tensor]):
        counts = split_answer_counts(split)
        missing = [r for r, n in enumerate(counts) if n and r not in per_row]
        wrong = [r for r, h in per_row.items() if h.shape[0] != counts[r]]
        if missing or wrong:
            raise ValueError(f"AnswerHidden: rows {(missing or wrong)[:5]} of the split have no hidden states or the "
                             f"wrong number; keep them from one whole pass over the split.")
        self.model, self.split, self.counts = weakref.ref(model), split, counts
        kept = [per_row[r] for r in range(len(counts)) if counts[r]]
        self.hidden = torch.cat(kept) if kept else torch.zeros(0, 0)
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)

    def serves(self, model: torch.nn.Module, split: TokenizedSplit) -> bool:
        """Whether these are `model`'s states on `split` (the objects they were kept from, unchanged in size)."""
        return self.model() is model and split is self.split and split_answer_counts(split) == self.counts

    def rows(self, rows: Sequence[int]) -> torch.Tensor:
        """The ``(N, H)`` states of these split rows, concatenated in the given order (a batch's `select` order)."""
        return torch.cat([self.hidden[self.offsets[r]:self.offsets[r + 1]] for r in rows])


def on_policy_step(step: int, fraction: float) -> bool:
    """Whether optimizer step `step` trains on the student's rollouts when train.on_policy=`fraction` of the steps
    do: evenly interleaved (0.5: every other step), a function of the step alone so a resumed run makes the same
    choices (the trainer and the time plan both ask this)."""
    return math.floor(round((step + 1) * fraction, 9)) > math.floor(round(step * fraction, 9))


class GlobalBatches:
    """Deterministic global batches: epoch e is a permutation seeded by (seed, e), cut into full
    batches of `size` rows (the last partial batch of an epoch is left out). Batch k depends only
    on k, so a resumed run sees exactly the batches the uninterrupted one would have."""

    def __init__(self, rows: int, size: int, seed: int):
        if rows < size:
            raise ValueError(f"The training split has {rows} rows, fewer than one global batch of {size} "
                             f"(train.batch_size x processes): use a smaller train.batch_size or more data.")
        self.rows, self.size, self.seed, self.per_epoch = rows, size, seed, rows // size
        self._epoch, self._perm = -1, None

    def __getitem__(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return self._perm[i * self.size:(i + 1) * self.size].tolist()
