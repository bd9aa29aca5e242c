"""Distillation losses as pure tensor functions.

One convention everywhere (see DESIGN.md):

    L = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)

- ``D`` is one of `DIVERGENCES` (forward KL by default), computed between the teacher's and the
  student's distributions at temperature T; CE always uses T = 1;
- causal shift as in transformers: ``logits[:, t]`` predicts ``labels[:, t + 1]``;
- only positions whose label is not ``ignore_index`` count, and both terms are means over them
  (or sums divided by an explicit ``normalizer``, so micro-batches add up to the full batch);
- no valid token: every term is a zero that still backpropagates (never NaN);
- all arithmetic in at least float32, whatever the dtype of the logits.

The teacher is a typed signal: `TeacherLogits` (full logits), `TeacherHidden` (hidden states and output layer,
its logits built a chunk at a time), `TeacherTopK` (the cache's top-k log-probs and tail mass, see `topk_buckets`), or
None (no teacher: CE alone, no distillation term). The loss settings are a `LossConfig`. `chunked_distillation_loss`
never builds the (N, V) logits of the whole batch; it matches the plain path in value and gradients.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .batches import auto_chunk_size
from .config import DIVERGENCES, LossConfig

TAIL_FLOOR = 1e-10  # smallest teacher tail mass used when K < V

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (log_p, log_q), both (N, K) -> (N,)


class DistillationLoss(NamedTuple):
    """The total loss and its two parts (scalar tensors; `total` carries the gradient). A part that was not
    measured is None: `kd` without a teacher, `ce` on the student's own samples (no reference there)."""

    total: torch.Tensor  # alpha * ce + (1 - alpha) * kd
    ce: Optional[torch.Tensor]  # hard-label cross-entropy at T = 1
    kd: Optional[torch.Tensor]  # T^2 * D(teacher_T || student_T)


# -- the teacher signal: one type per kind of teacher information --------------------------------------

@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's logits ``(N, V')`` at the N answer positions."""

    logits: torch.Tensor

    @property
    def width(self) -> int:
        return self.logits.shape[-1]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TeacherLogits":
        """The same signal with `fn` applied to each per-position tensor (rows selected, moved, ...)."""
        return TeacherLogits(fn(self.logits))

    def chunk(self, i: int, j: int, vocab: int) -> "TeacherLogits":
        return TeacherLogits(self.logits[i:j, :vocab])

    def to(self, device: torch.device | str) -> "TeacherLogits":
        return self.map(lambda x: x.to(device))


@dataclass(frozen=True)
class TeacherHidden:
    """The teacher's final hidden states ``(N, H')`` at the answer positions and its output layer ``(V', H')``
    (and bias): its logits are built a chunk at a time, never all (N, V') at once."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TeacherHidden":
        return TeacherHidden(fn(self.hidden), self.weight, self.bias)

    def to(self, device: torch.device | str) -> "TeacherHidden":
        return TeacherHidden(self.hidden.to(device), self.weight.to(device),
                             None if self.bias is None else self.bias.to(device))

    @torch.no_grad()
    def chunk(self, i: int, j: int, vocab: int) -> TeacherLogits:
        """The teacher's logits at positions i:j over the first `vocab` rows of its output layer."""
        dtype = torch.promote_types(self.weight.dtype, self.hidden.dtype)
        w = self.weight[:vocab].to(dtype)
        b = None if self.bias is None else self.bias[:vocab].to(dtype)
        return TeacherLogits(F.linear(self.hidden[i:j].to(dtype), w, b))


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's K most likely token ids ``(N, K)`` at each answer position, their log-probs at T = 1
    ``(N, K)`` and the mass outside them ``(N,)`` (default ``1 - sum(exp(logprobs))``): what the cache stores."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: Optional[torch.Tensor] = None

    width = None  # fits any vocabulary that holds its ids

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TeacherTopK":
        return TeacherTopK(fn(self.ids), fn(self.logprobs), None if self.tail is None else fn(self.tail))

    def chunk(self, i: int, j: int, vocab: int) -> "TeacherTopK":
        return TeacherTopK(self.ids[i:j], self.logprobs[i:j], None if self.tail is None else self.tail[i:j])

    def to(self, device: torch.device | str) -> "TeacherTopK":
        return self.map(lambda x: x.to(device))

    def check(self, vocab: int) -> None:
        """Raise unless every id is in [0, vocab) (one host sync: once per batch, not per chunk)."""
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(f"top-k ids {tuple(self.ids.shape)} and log-probs {tuple(self.logprobs.shape)} differ.")
        if self.ids.numel():
            low, high = map(int, torch.aminmax(self.ids))
            if high >= vocab or low < 0:
                raise ValueError(f"top-k ids range over [{low}, {high}] but the student has {vocab} logits: the "
                                 f"teacher cache was built with another vocabulary (rebuild it).")


TeacherSignal = Union[TeacherLogits, TeacherHidden, TeacherTopK]  # None: no teacher, no distillation term


# -- divergences between two distributions given as log-probabilities ---------------------------------

def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a || b) = sum a (log a - log b) of two ``(N, K)`` log-probabilities, ``(N,)``; entries where
    a = 0 contribute exactly 0; a NaN in either stays NaN (the training guard and the reports must see it). The
    package's one KL (the loss's forward KL, agreement, the cache's fidelity)."""
    diff = torch.where(log_a == -math.inf, torch.zeros_like(log_a), log_a - log_b)  # no 0 * inf, no NaN grads
    return (log_a.exp() * diff).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably in log space.

    Where both are -inf (a token neither distribution can produce) the mixture is -inf too, with a zero
    gradient: ``logaddexp(-inf, -inf)`` alone would give NaN gradients there."""
    x, y = log_a + math.log(weight_a), log_b + math.log1p(-weight_a)
    both = (x == -math.inf) & (y == -math.inf)
    zero = torch.zeros_like(x)
    mixed = torch.logaddexp(torch.where(both, zero, x), torch.where(both, zero, y))
    return torch.where(both, torch.full_like(mixed, -math.inf), mixed)


def divergence_per_token(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "forward_kl", *,
                         beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """``(N,)`` divergence D(p || q) between teacher log-probs `log_p` and student log-probs `log_q`.

    Both are ``(N, K)`` normalised log-probabilities over the same K outcomes. P is the teacher, Q the student:

    - ``forward_kl``: KL(P || Q), mean-seeking (Hinton et al. 2015).
    - ``reverse_kl``: KL(Q || P), mode-seeking (MiniLLM).
    - ``jsd``: generalized Jensen-Shannon with M = beta P + (1 - beta) Q,
      ``[beta KL(P || M) + (1 - beta) KL(Q || M)] / (beta (1 - beta))``. The division makes
      beta -> 0 tend to forward KL and beta -> 1 to reverse KL continuously (the GKD paper's
      unscaled form, as in TRL's ``generalized_jsd_loss``, tends to 0 at both ends); beta = 0.5
      gives 4 x the Jensen-Shannon divergence. beta = 0 and 1 are computed as the exact KLs.
    - ``skew_kl``: KL(P || skew P + (1 - skew) Q) (DistiLLM); skew = 0 is forward KL, larger
      skew bounds the loss where the student gives a token almost no mass.
    - ``skew_reverse_kl``: KL(Q || skew Q + (1 - skew) P); skew = 0 is reverse KL.
    - ``tvd``: total variation, ``0.5 * sum |P - Q|``, bounded in [0, 1].
    """
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _mix(log_p, log_q, beta)
        return (beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)) / (beta * (1.0 - beta))
    if divergence == "skew_kl":
        return kl(log_p, log_q if skew == 0.0 else _mix(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return kl(log_q, log_p if skew == 0.0 else _mix(log_q, log_p, skew))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence={divergence!r}: use one of {', '.join(DIVERGENCES)}.")


# -- the teacher given as top-k log-probs ------------------------------------------------------------

def topk_buckets(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0, *,
                 check_ids: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student as distributions over K + 1 buckets: the teacher's top-k tokens and "the rest".

    Args:
        student_logits: ``(N, V)`` full student logits (float32 or wider).
        teacher: the teacher's ``(N, K)`` top-k ids (distinct) and T = 1 log-probs, and ``(N,)`` tail mass.
        check_ids: validate the ids against V (a host sync; the chunked loss checks once per batch instead).
        temperature: T. Both bucket distributions are built at T = 1 (the student's exactly from its
            logits: its tail bucket is its whole mass outside the teacher's top-k) and then tempered
            the same way, ``b^(1/T)`` renormalised over the K + 1 buckets, so identical models give a
            zero divergence at every T. With K = V this is exactly ``softmax(logits / T)``; with
            K < V the tail counts as one token, whereas full-vocabulary tempering would spread mass
            over every tail token (at T = 2 that can be most of it), so the two losses differ there.

    Returns:
        ``(log_p, log_q)``, both ``(N, K + 1)`` log-probabilities; column K is the tail (``(N, V)``, no tail
        column, when K = V). Any divergence of these is the divergence between the bucketed distributions; at
        T = 1 forward KL is ``sum_top p (log p - log q) + p_tail (log p_tail - log q_tail)``, the full KL when K = V.
    """
    if teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"top-k ids {tuple(teacher.ids.shape)}, log-probs {tuple(teacher.logprobs.shape)} and "
                         f"student logits {tuple(student_logits.shape)} must agree on (N, K) and N.")
    vocab = student_logits.shape[-1]
    if check_ids:
        teacher.check(vocab)
    dtype = student_logits.dtype
    lp = teacher.logprobs.detach().to(dtype)
    ids = teacher.ids.long()
    picked = student_logits.gather(-1, ids)
    if ids.shape[-1] == vocab:  # the top-k is the whole vocabulary: no tail bucket at all
        return F.log_softmax(lp / temperature, dim=-1), F.log_softmax(picked / temperature, dim=-1)
    tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0) if teacher.tail is None else teacher.tail.detach()
    # With K < V the true tail is never empty; a floor keeps reverse and skew divergences finite when
    # rounding (fp16 log-probs, a near-certain token) makes it look so.
    log_tail = tail.to(dtype).clamp_min(TAIL_FLOOR).log().unsqueeze(-1)
    log_p = F.log_softmax(torch.cat([lp, log_tail], -1) / temperature, dim=-1)
    rest = student_logits.scatter(-1, ids, torch.finfo(dtype).min)  # top-k removed, finite so gradients stay finite
    log_rest = torch.logsumexp(rest, -1, keepdim=True)
    log_q = F.log_softmax(torch.cat([picked, log_rest], -1) / temperature, dim=-1)
    return log_p, log_q


# -- the hybrid loss over selected tokens -------------------------------------------------------------

def divergence_name(divergence: Divergence) -> str:
    """How a divergence function is named in logs, results and checkpoint fingerprints."""
    return getattr(divergence, "__name__", None) or type(divergence).__name__


def named_divergence(spec: LossConfig) -> Divergence:
    """The divergence `spec` names (loss.divergence with its beta / skew) as a function of (log_p, log_q)."""
    if spec.divergence == "forward_kl":
        return kl
    return functools.partial(divergence_per_token, divergence=spec.divergence, beta=spec.beta, skew=spec.skew)


def _check_widths(student_width: int, teacher: Optional[TeacherSignal], vocab_size: Optional[int]) -> int:
    """The number of logits both sides are compared over; raises when the output layers cannot be compared."""
    width = None if teacher is None else teacher.width
    if vocab_size is None:
        if width is not None and width != student_width:
            raise ValueError(
                f"student logits ({student_width} wide) and the teacher's ({width}) differ. If both models use one "
                "tokenizer and only their output layers are padded differently, pass vocab_size=len(tokenizer). "
                "Different tokenizers cannot be compared token by token: use sequence-level distillation (train "
                "on the teacher's generated answers) instead.")
        return student_width
    if vocab_size > student_width or (width is not None and vocab_size > width):
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits' width (student {student_width}, teacher "
                         f"{width}): pass len(tokenizer).")
    return vocab_size


def token_distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher: Optional[TeacherSignal],
                            spec: LossConfig, *, vocab_size: Optional[int] = None,
                            normalizer: Optional[float] = None, divergence: Optional[Divergence] = None,
                            check_ids: bool = True) -> DistillationLoss:
    """The hybrid loss over already-selected answer tokens (no shift, no mask: every row counts).

    Args:
        student_logits: ``(N, V)`` student logits at the N positions that predict a target.
        targets: ``(N,)`` token ids those positions predict.
        teacher: the teacher at the same N positions (`TeacherLogits`, `TeacherHidden` or `TeacherTopK`), or
            None: then only CE is measured (``kd`` is None), which `spec` must allow (alpha = 1).
        spec: the loss settings (`LossConfig`: alpha, temperature, divergence, beta, skew); see `distillation_loss`.
        vocab_size: compare over the first `vocab_size` logits only (the tokenizer's real vocabulary),
            so rows an output layer pads on (e.g. 151,936 vs 152,064) never take probability mass
            and student and teacher may differ in padding. Default: both must have the same width.
        normalizer: divide the summed per-token terms by this instead of N (e.g. the answer tokens
            of the whole accumulated batch, so micro-batches add up to exactly the full batch).
        divergence: D as a function of teacher and student log-probs ``(N, K)`` returning ``(N,)``, instead of
            the one `spec` names (a divergence written in a notebook cell).
        check_ids: validate top-k ids against the vocabulary (see `topk_buckets`).
    """
    if teacher is None and spec.alpha != 1.0:
        raise ValueError(f"No teacher given but alpha={spec.alpha}: the divergence term needs the teacher's logits, "
                         f"hidden states or top-k; alpha=1 (CE only) is the one setting that needs no teacher.")
    vocab = _check_widths(student_logits.shape[-1], teacher, vocab_size)
    student_logits = student_logits[..., :vocab]
    n = targets.numel()
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), None if teacher is None else zero.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 logits are upcast
    s = student_logits.to(dtype)
    ce = F.cross_entropy(s, targets, reduction="sum") / denom
    if teacher is None:  # alpha = 1 without a teacher: the divergence is not measured
        return DistillationLoss(ce, ce.detach(), None)
    t = spec.temperature
    # At alpha = 1 the KD term is still reported (to monitor the gap to the teacher) but carries no gradient.
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.alpha < 1.0):
        if isinstance(teacher, TeacherTopK):
            log_p, log_q = topk_buckets(s, teacher, t, check_ids=check_ids)
        else:
            logits = teacher.chunk(0, n, vocab).logits  # hidden states: the teacher's logits, built here
            log_q = F.log_softmax(s / t, dim=-1)
            log_p = F.log_softmax(logits.detach().to(dtype) / t, dim=-1)
        per_token = (divergence or named_divergence(spec))(log_p, log_q)
        kd = per_token.sum() * (t ** 2) / denom
    total = spec.alpha * ce + (1.0 - spec.alpha) * kd
    return DistillationLoss(total, ce, kd)


def sampled_token_loss(student_logits: torch.Tensor, tokens: torch.Tensor, teacher: TeacherLogits,
                       spec: LossConfig, *, vocab_size: Optional[int] = None,
                       normalizer: Optional[float] = None) -> DistillationLoss:
    """On-policy distillation with the sampled-token estimator: at each position the student sampled `tokens`
    from, the per-token log-ratio ``r = log q_T(y) - log p_T(y)`` is a (detached) cost and the loss is
    ``T^2 * sum(r * log q_T(y)) / normalizer``, whose gradient is the REINFORCE estimate of the per-token reverse
    KL's gradient (the score function's mean, zero, is left out), as in on-policy distillation recipes that use
    the teacher's log-prob as a dense per-token reward. `total` carries that gradient but has the value of `kd`,
    the estimate of reverse KL itself (``T^2 * sum(r) / normalizer``); `ce` is None (no reference on sampled
    tokens). T is ``spec.temperature``.

    Args:
        student_logits: ``(N, V)`` logits at the positions that predicted the sampled tokens.
        tokens: ``(N,)`` the sampled tokens.
        teacher: the teacher's ``(N, V')`` logits at the same positions.
    """
    vocab = _check_widths(student_logits.shape[-1], teacher, vocab_size)
    n = tokens.numel()
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, None, zero.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    t = spec.temperature
    log_q = F.log_softmax(student_logits[..., :vocab].to(dtype) / t, -1).gather(-1, tokens[:, None])[:, 0]
    log_p = F.log_softmax(teacher.logits[..., :vocab].detach().to(dtype) / t, -1).gather(-1, tokens[:, None])[:, 0]
    ratio = (log_q - log_p).detach()
    scale = t ** 2 / denom
    estimate, surrogate = ratio.sum() * scale, (ratio * log_q).sum() * scale
    return DistillationLoss(estimate + surrogate - surrogate.detach(), None, estimate)  # value: the estimate


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[TeacherSignal],
                      spec: LossConfig, *, ignore_index: int = -100, vocab_size: Optional[int] = None,
                      normalizer: Optional[float] = None, divergence: Optional[Divergence] = None
                      ) -> DistillationLoss:
    """``alpha * CE + (1 - alpha) * T^2 * D(teacher_T || student_T)`` over the unmasked tokens.

    Args:
        student_logits: ``(B, L, V)`` student logits.
        labels: ``(B, L)`` input ids with `ignore_index` on prompt and padding. Causal shift:
            ``logits[:, t]`` is scored against ``labels[:, t + 1]``; the last position never counts.
        teacher: the teacher at every position, aligned with the logits before the shift: `TeacherLogits`
            ``(B, L, V)``, `TeacherTopK` ``(B, L, K)`` (tail ``(B, L)``), `TeacherHidden` ``(B, L, H)``; or None
            (alpha = 1: CE alone, ``kd`` None).
        spec: the loss settings, a `LossConfig`:

            - alpha: weight of the hard-label term. 1 = plain CE fine-tuning (D is still reported, without
              gradient), 0 = pure distillation.
            - temperature: T > 0 divides both models' logits inside D only (CE uses T = 1). T -> 0 sharpens towards the
              argmax, T = 1 leaves the logits, large T flattens towards uniform. D is multiplied by T^2 for every
              divergence, so the soft gradients keep the scale of the hard ones as T grows (Hinton et al. 2015).
            - divergence, beta (jsd), skew (skew_kl, skew_reverse_kl): D, ``forward_kl`` by default, and its
              parameters; see `divergence_per_token` for each formula and what beta and skew do.
        ignore_index: label value of tokens that never count.
        vocab_size, normalizer, divergence: as in `token_distillation_loss` (N: the number of unmasked tokens).

    Returns:
        DistillationLoss(total, ce, kd): scalar means over the unmasked target tokens; all zero
        (with a gradient path) when no token is unmasked.
    """
    if student_logits.dim() != 3 or labels.dim() != 2 or student_logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, L, V) and labels (B, L); got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    picked = None if teacher is None else teacher.map(lambda x: x[:, :-1][mask])
    return token_distillation_loss(student_logits[:, :-1][mask], shifted[mask], picked, spec,
                                   vocab_size=vocab_size, normalizer=normalizer, divergence=divergence)


# -- the memory-efficient path: from hidden states, chunk by chunk ------------------------------------

class _StoredGradients(torch.autograd.Function):
    """Hands the loss computed chunk by chunk (`chunked_distillation_loss`) to autograd: the forward returns the
    total already computed, the backward scales the gradients stored with it by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, total, grads):
        ctx.need = tuple(g is not None for g in grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total):
        # grad_total is 1 for loss.backward(), or the loss scale under fp16 (GradScaler): the fp32 gradients are
        # multiplied by it first and cast to the parameters' dtypes after, so nothing underflows on the way.
        unit = bool(torch.equal(grad_total, torch.ones_like(grad_total)))
        stored = iter(ctx.saved_tensors)
        return (*((next(stored) if unit else next(stored) * grad_total).to(dtype) if n else None
                  for n, dtype in zip(ctx.need, ctx.dtypes)), None, None)


def chunked_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                              teacher: Optional[TeacherSignal], spec: LossConfig, *,
                              student_bias: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
                              normalizer: Optional[float] = None, compute_dtype: Optional[torch.dtype] = None,
                              divergence: Optional[Divergence] = None) -> DistillationLoss:
    """`token_distillation_loss` from the student's hidden states, never holding all (N, V) logits.

    The student's logits are ``student_hidden @ student_weight.T (+ student_bias)``. The N tokens are
    walked in chunks of ``spec.chunk_size`` (0: `auto_chunk_size`); for each chunk the logits are built, the CE
    and divergence terms and their gradients with respect to the hidden states and the output layer are
    computed (as Liger Kernel's fused linear losses do), and the chunk's logits are freed. Peak memory is a few
    (chunk_size, V) tensors plus the weight gradient, instead of several (N, V) ones. Value and gradients equal
    the plain path's (same float32 arithmetic, summed in another order).

    Args:
        student_hidden: ``(N, H)`` final hidden states (after the final norm) at the answer positions.
        student_weight: ``(V, H)`` the output layer's weight (tied or not); `student_bias` ``(V,)``.
        targets: ``(N,)`` token ids to predict.
        teacher: the teacher at the same positions; a `TeacherHidden` has its logits built a chunk at a time
            too. None: CE alone (alpha = 1).
        compute_dtype: dtype of the output-layer matmuls (default: the hidden states' dtype, e.g.
            bfloat16 under autocast); the loss itself is always computed in float32, and the gradients
            are kept in float32 (scaled before the one 16-bit matmul), so fp16 gives fp32's gradients.
        spec, vocab_size, normalizer, divergence: as in `token_distillation_loss`.
    """
    if teacher is None and spec.alpha != 1.0:
        raise ValueError(f"No teacher given but alpha={spec.alpha}: give the teacher's logits, hidden states or "
                         f"top-k (only alpha=1, CE alone, needs no teacher).")
    n = targets.numel()
    if student_hidden.shape[0] != n:
        raise ValueError(f"student_hidden has {student_hidden.shape[0]} rows for {n} targets.")
    vocab = _check_widths(student_weight.shape[0], teacher, vocab_size)
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_hidden.sum() * 0.0 + student_weight.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), None if teacher is None else zero.detach())
    if isinstance(teacher, TeacherTopK):
        teacher.check(vocab)  # once here, not in every chunk (each check is a host sync)
    dtype = compute_dtype or student_hidden.dtype
    size = int(spec.chunk_size or auto_chunk_size(vocab, student_hidden.device.type))
    inputs = (student_hidden, student_weight, student_bias)  # the tensors that get a stored gradient
    need = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in inputs)
    w = student_weight.detach()[:vocab].to(dtype)
    b = None if student_bias is None else student_bias.detach()[:vocab].to(dtype)
    acc = torch.promote_types(student_weight.dtype, torch.float32)  # every stored gradient is kept in >= fp32
    grads = [torch.zeros(x.shape, dtype=acc, device=x.device) if want else None for x, want in zip(inputs, need)]
    sums = torch.zeros(3, dtype=torch.promote_types(student_hidden.dtype, torch.float32), device=student_hidden.device)
    # The loss is a sum over tokens divided by the normalizer N, so each logit's gradient is about |p - q| / N: cast
    # to fp16 as it is, most of the soft (teacher-vs-student) part underflows to zero. It is multiplied by N (back
    # to per-token size) before the one low-precision matmul and divided again in fp32.
    scale = denom if dtype in (torch.float16, torch.bfloat16) else 1.0
    for i in range(0, n, size):
        h = student_hidden.detach()[i:i + size].to(dtype)
        with torch.enable_grad():
            logits = F.linear(h, w, b).to(sums.dtype).requires_grad_(any(need))
            part = token_distillation_loss(logits, targets[i:i + size], None if teacher is None else teacher.chunk(
                i, i + size, vocab), spec, normalizer=denom, divergence=divergence, check_ids=False)
            g = torch.autograd.grad(part.total, logits)[0].to(acc) if any(need) else None
        kd = torch.zeros_like(part.ce) if part.kd is None else part.kd
        sums += torch.stack([part.total.detach(), part.ce.detach(), kd.detach()]).to(sums.dtype)
        if need[0]:
            grads[0][i:i + size] = ((g * scale).to(dtype).matmul(w).to(acc) / scale if scale != 1.0
                                    else g.to(dtype).matmul(w))
        if need[1]:
            grads[1][:vocab].addmm_(g.t(), h.to(acc))
        if need[2]:
            grads[2][:vocab] += g.sum(0)
        del logits, part
    total = _StoredGradients.apply(*inputs, sums[0], grads) if any(need) else sums[0]
    return DistillationLoss(total, sums[1], None if teacher is None else sums[2])
