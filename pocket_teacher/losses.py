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

Three ways to give the teacher: full logits, top-k log-probs (a cache, see `topk_buckets`), or,
in `chunked_distillation_loss`, its hidden states and output layer. The chunked function never
builds the (N, V) logits of the whole batch; it matches the plain path in value and gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

TAIL_FLOOR = 1e-10  # smallest teacher tail mass used when K < V

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


class DistillationLoss(NamedTuple):
    """The total loss and its two parts (all scalar tensors; `total` carries the gradient)."""

    total: torch.Tensor  # alpha * ce + (1 - alpha) * kd
    ce: torch.Tensor  # hard-label cross-entropy at T = 1
    kd: torch.Tensor  # T^2 * D(teacher_T || student_T)


def check_loss_args(alpha: float, temperature: float, divergence: str = "forward_kl", beta: float = 0.5,
                    skew: float = 0.1) -> None:
    """Raise ValueError naming the argument, its value and the allowed range."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: use a value in [0, 1] (1 = plain CE, 0 = pure distillation).")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: use a value > 0 (1 = unchanged logits).")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: use one of {', '.join(DIVERGENCES)}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r}: use a value in [0, 1] (0 = forward KL, 1 = reverse KL).")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew={skew!r}: use a value in [0, 1) (0 = plain KL; DistiLLM uses 0.1).")


# -- divergences between two distributions given as log-probabilities ---------------------------------

def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a || b) = sum a (log a - log b); entries where a = 0 contribute exactly 0."""
    diff = torch.where(log_a > -math.inf, log_a - log_b, torch.zeros_like(log_a))  # no 0 * inf, no NaN grads
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

    Both are ``(N, K)`` normalised log-probabilities over the same K outcomes. P is the teacher, Q
    the student:

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
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _mix(log_p, log_q, beta)
        return (beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)) / (beta * (1.0 - beta))
    if divergence == "skew_kl":
        return _kl(log_p, log_q if skew == 0.0 else _mix(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, log_p if skew == 0.0 else _mix(log_q, log_p, skew))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence={divergence!r}: use one of {', '.join(DIVERGENCES)}.")


# -- the teacher given as top-k log-probs ------------------------------------------------------------

def check_topk_ids(topk_ids: torch.Tensor, vocab: int) -> None:
    """Raise unless every top-k id is in [0, vocab) (one host sync: call it once per batch, not per chunk)."""
    if topk_ids.numel():
        low, high = torch.aminmax(topk_ids)
        low, high = int(low), int(high)
        if high >= vocab or low < 0:
            raise ValueError(f"top-k ids range over [{low}, {high}] but the student has {vocab} logits: the teacher "
                             f"cache was built with another vocabulary (rebuild it).")


def topk_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 tail_mass: Optional[torch.Tensor] = None, temperature: float = 1.0, *, check_ids: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student as distributions over K + 1 buckets: the teacher's top-k tokens and "the rest".

    Args:
        student_logits: ``(N, V)`` full student logits (float32 or wider).
        topk_ids: ``(N, K)`` the teacher's K most likely token ids (distinct) at each position.
        topk_logprobs: ``(N, K)`` the teacher's log-probs of those tokens at T = 1.
        tail_mass: ``(N,)`` teacher probability outside the top-k; default ``1 - sum(exp(topk_logprobs))``.
        check_ids: validate the ids against V (a host sync; the chunked loss checks once per batch instead).
        temperature: T. Both bucket distributions are built at T = 1 (the student's exactly from its
            logits: its tail bucket is its whole mass outside the teacher's top-k) and then tempered
            the same way, ``b^(1/T)`` renormalised over the K + 1 buckets, so identical models give a
            zero divergence at every T. With K = V this is exactly ``softmax(logits / T)``; with
            K < V the tail counts as one token, whereas full-vocabulary tempering would spread mass
            over every tail token (at T = 2 that can be most of it), so the two losses differ there.

    Returns:
        ``(log_p, log_q)``, both ``(N, K + 1)`` log-probabilities; column K is the tail (``(N, V)``,
        no tail column, when K = V). Any
        divergence of these is the divergence between the bucketed distributions; at T = 1 forward
        KL is ``sum_top p (log p - log q) + p_tail (log p_tail - log q_tail)``, the full KL when K = V.
    """
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"top-k ids {tuple(topk_ids.shape)}, log-probs {tuple(topk_logprobs.shape)} and student "
                         f"logits {tuple(student_logits.shape)} must agree on (N, K) and N.")
    vocab = student_logits.shape[-1]
    if check_ids:
        check_topk_ids(topk_ids, vocab)
    dtype = student_logits.dtype
    lp = topk_logprobs.to(dtype)
    ids = topk_ids.long()
    picked = student_logits.gather(-1, ids)
    if ids.shape[-1] == vocab:  # the top-k is the whole vocabulary: no tail bucket at all
        return F.log_softmax(lp / temperature, dim=-1), F.log_softmax(picked / temperature, dim=-1)
    if tail_mass is None:
        tail_mass = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    # With K < V the true tail is never empty; a floor keeps reverse and skew divergences finite when
    # rounding (fp16 log-probs, a near-certain token) makes it look so.
    log_tail = tail_mass.to(dtype).clamp_min(TAIL_FLOOR).log().unsqueeze(-1)
    log_p = F.log_softmax(torch.cat([lp, log_tail], -1) / temperature, dim=-1)
    rest = student_logits.scatter(-1, ids, torch.finfo(dtype).min)  # top-k removed, finite so gradients stay finite
    log_rest = torch.logsumexp(rest, -1, keepdim=True)
    log_q = F.log_softmax(torch.cat([picked, log_rest], -1) / temperature, dim=-1)
    return log_p, log_q


# -- the hybrid loss over selected tokens -------------------------------------------------------------

def token_distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                            targets: torch.Tensor, *, alpha: float, temperature: float,
                            divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                            teacher_topk_ids: Optional[torch.Tensor] = None,
                            teacher_topk_logprobs: Optional[torch.Tensor] = None,
                            teacher_tail_mass: Optional[torch.Tensor] = None,
                            vocab_size: Optional[int] = None,
                            normalizer: Optional[float] = None, check_ids: bool = True) -> DistillationLoss:
    """The hybrid loss over already-selected answer tokens (no shift, no mask: every row counts).

    Args:
        student_logits: ``(N, V)`` student logits at the N positions that predict a target.
        teacher_logits: ``(N, V')`` teacher logits at the same positions, or None with top-k inputs.
        targets: ``(N,)`` token ids those positions predict.
        teacher_topk_ids, teacher_topk_logprobs, teacher_tail_mass: the teacher as ``(N, K)`` top-k
            ids and T = 1 log-probs and ``(N,)`` leftover mass, instead of `teacher_logits` (see
            `topk_buckets`).
        vocab_size: compare over the first `vocab_size` logits only (the tokenizer's real vocabulary),
            so rows an output layer pads on (e.g. 151,936 vs 152,064) never take probability mass
            and student and teacher may differ in padding. Default: both must have the same width.
        normalizer: divide the summed per-token terms by this instead of N (e.g. the answer tokens
            of the whole accumulated batch, so micro-batches add up to exactly the full batch).
        check_ids: validate top-k ids against the vocabulary (see `topk_buckets`).
        alpha, temperature, divergence, beta, skew: see `distillation_loss`.

    Returns:
        DistillationLoss of scalars in at least float32.
    """
    check_loss_args(alpha, temperature, divergence, beta, skew)
    topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if topk and teacher_logits is not None:
        raise ValueError("Give the teacher either as teacher_logits or as teacher_topk_ids + teacher_topk_logprobs.")
    if not topk and teacher_logits is None and alpha != 1.0:
        raise ValueError(f"No teacher given but alpha={alpha}: the divergence term needs teacher_logits or top-k "
                         f"inputs; alpha=1 (CE only) is the one setting that needs no teacher.")
    if topk and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("Top-k teacher inputs need both teacher_topk_ids and teacher_topk_logprobs.")
    no_teacher = not topk and teacher_logits is None
    if vocab_size is not None:
        if vocab_size > student_logits.shape[-1] or (not topk and not no_teacher
                                                      and vocab_size > teacher_logits.shape[-1]):
            raise ValueError(f"vocab_size={vocab_size} exceeds the logits' width (student {student_logits.shape[-1]}"
                             f", teacher {None if topk else teacher_logits.shape[-1]}): pass len(tokenizer).")
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = None if topk or no_teacher else teacher_logits[..., :vocab_size]
    elif not topk and not no_teacher and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ. "
            "If both models use one tokenizer and only their output layers are padded differently, pass "
            "vocab_size=len(tokenizer). Different tokenizers cannot be compared token by token: use sequence-level "
            "distillation (train on the teacher's generated answers) instead.")
    n = targets.numel()
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), zero.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 logits are upcast
    s = student_logits.to(dtype)
    ce = F.cross_entropy(s, targets, reduction="sum") / denom
    if no_teacher:  # alpha = 1 without a teacher: the divergence is not measured
        return DistillationLoss(ce, ce.detach(), torch.full_like(ce, math.nan).detach())
    # At alpha = 1 the KD term is still reported (to monitor the gap to the teacher) but carries no gradient.
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
        if topk:
            log_p, log_q = topk_buckets(s, teacher_topk_ids, teacher_topk_logprobs.detach(),
                                        None if teacher_tail_mass is None else teacher_tail_mass.detach(),
                                        temperature, check_ids=check_ids)
        else:
            log_q = F.log_softmax(s / temperature, dim=-1)
            log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        per_token = divergence_per_token(log_p, log_q, divergence, beta=beta, skew=skew)
        kd = per_token.sum() * (temperature ** 2) / denom
    total = alpha * ce + (1.0 - alpha) * kd
    return DistillationLoss(total, ce, kd)


def sampled_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *,
                       temperature: float = 1.0, vocab_size: Optional[int] = None,
                       normalizer: Optional[float] = None) -> DistillationLoss:
    """On-policy distillation with the sampled-token estimator: at each position the student sampled `tokens`
    from, the per-token log-ratio ``r = log q_T(y) - log p_T(y)`` is a (detached) cost and the loss is
    ``T^2 * sum(r * log q_T(y)) / normalizer``, whose gradient is the REINFORCE estimate of the per-token reverse
    KL's gradient (the score function's mean, zero, is left out), as in on-policy distillation recipes that use
    the teacher's log-prob as a dense per-token reward. `total` carries that gradient but has the value of `kd`,
    the estimate of reverse KL itself (``T^2 * sum(r) / normalizer``); `ce` is NaN (no reference on sampled
    tokens).

    Args:
        student_logits, teacher_logits: ``(N, V)`` logits at the positions that predicted the sampled tokens.
        tokens: ``(N,)`` the sampled tokens.
    """
    check_loss_args(0.0, temperature)
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    n = tokens.numel()
    denom = float(normalizer) if normalizer is not None else float(n)
    nan = torch.full((), math.nan, device=student_logits.device)
    if n == 0 or denom == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, nan, zero.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, -1).gather(-1, tokens[:, None])[:, 0]
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, -1).gather(-1, tokens[:, None])[:, 0]
    ratio = (log_q - log_p).detach()
    scale = temperature ** 2 / denom
    estimate, surrogate = ratio.sum() * scale, (ratio * log_q).sum() * scale
    return DistillationLoss(estimate + surrogate - surrogate.detach(), nan, estimate)  # value: the estimate


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                      *, alpha: float, temperature: float, divergence: str = "forward_kl", beta: float = 0.5,
                      skew: float = 0.1, ignore_index: int = -100,
                      teacher_topk_ids: Optional[torch.Tensor] = None,
                      teacher_topk_logprobs: Optional[torch.Tensor] = None,
                      teacher_tail_mass: Optional[torch.Tensor] = None,
                      vocab_size: Optional[int] = None, normalizer: Optional[float] = None) -> DistillationLoss:
    """``alpha * CE + (1 - alpha) * T^2 * D(teacher_T || student_T)`` over the unmasked tokens.

    Args:
        student_logits: ``(B, L, V)`` student logits.
        teacher_logits: ``(B, L, V)`` teacher logits for the same input ids (None with top-k inputs).
        labels: ``(B, L)`` input ids with `ignore_index` on prompt and padding. Causal shift:
            ``logits[:, t]`` is scored against ``labels[:, t + 1]``; the last position never counts.
        alpha: weight of the hard-label term. 1 = plain CE fine-tuning (D is still reported, without
            gradient), 0 = pure distillation.
        temperature: T > 0 divides both models' logits inside D only (CE uses T = 1). T -> 0
            sharpens towards the argmax, T = 1 leaves the logits, large T flattens towards uniform.
            D is multiplied by T^2 for every divergence, so the soft gradients keep the scale of the
            hard ones as T grows (Hinton et al. 2015).
        divergence: ``forward_kl`` (default), ``reverse_kl``, ``jsd``, ``skew_kl``,
            ``skew_reverse_kl`` or ``tvd``; see `divergence_per_token` for each formula.
        beta: jsd only. 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher),
            continuous in between (0.5 = 4 x Jensen-Shannon).
        skew: skew_kl / skew_reverse_kl only, in [0, 1). 0 = the plain KL; towards 1 the mixture
            approaches the first argument and the divergence shrinks to 0.
        ignore_index: label value of tokens that never count.
        teacher_topk_ids, teacher_topk_logprobs: ``(B, L, K)``, the teacher's top-k at each position
            (aligned with the logits, before the shift), and `teacher_tail_mass` ``(B, L)``.
        vocab_size: compare over the first `vocab_size` logits (the real tokenizer vocabulary).
        normalizer: divide the summed per-token terms by this instead of the number of unmasked
            tokens (gradient accumulation: pass the token count of the whole accumulated batch).

    Returns:
        DistillationLoss(total, ce, kd): scalar means over the unmasked target tokens; all zero
        (with a gradient path) when no token is unmasked.
    """
    if student_logits.dim() != 3 or labels.dim() != 2 or student_logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, L, V) and labels (B, L); got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    shifted = labels[:, 1:]
    mask = shifted != ignore_index

    def pick(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x[:, :-1][mask]

    return token_distillation_loss(student_logits[:, :-1][mask], pick(teacher_logits), shifted[mask],
                                   alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                                   skew=skew, teacher_topk_ids=pick(teacher_topk_ids),
                                   teacher_topk_logprobs=pick(teacher_topk_logprobs),
                                   teacher_tail_mass=pick(teacher_tail_mass), vocab_size=vocab_size,
                                   normalizer=normalizer)


# -- the memory-efficient path: from hidden states, chunk by chunk ------------------------------------

def auto_chunk_size(vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk of the chunked loss, from the device and the vocabulary.

    CPU: one chunk's (C, V) fp32 logits hold about 32 MiB (caches stay warm; measured fastest here).
    CUDA: about 512 MiB of fp32 logits but at least 1,024 tokens, in multiples of 256, so the output-layer
    matmuls keep the GPU busy (1,024 tokens at Qwen's 151,665-token vocabulary, 2,560 at SmolLM2's 49,152).
    The loss's own memory is about six such (C, V) buffers; `pocket_teacher.plan` counts them."""
    if device_type == "cuda":
        return max(1024, ((1 << 27) // max(1, vocab_size)) // 256 * 256)
    return max(8, (1 << 23) // max(1, vocab_size))


class _ChunkedLoss(torch.autograd.Function):
    """Loss and its gradients computed chunk by chunk in the forward pass (as Liger Kernel's fused
    linear losses do); backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, options):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        compute_dtype, chunk, vocab = options.pop("compute_dtype"), options.pop("chunk_size"), options.pop("vocab")
        w = weight[:vocab].to(compute_dtype)
        b = None if bias is None else bias[:vocab].to(compute_dtype)
        acc = torch.promote_types(weight.dtype, torch.float32)  # every stored gradient is kept in >= fp32
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need[2] else None
        sums = torch.zeros(3, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        # The loss is a sum over tokens divided by the normalizer N, so each logit's gradient is about |p - q| / N:
        # cast to fp16 as it is, most of the soft (teacher-vs-student) part underflows to zero. It is multiplied
        # by N (back to per-token size) before the one low-precision matmul and divided again in fp32.
        scale = float(options["normalizer"]) if compute_dtype in (torch.float16, torch.bfloat16) else 1.0
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(compute_dtype)
            with torch.enable_grad():
                logits = F.linear(h, w, b).to(sums.dtype).requires_grad_(any(need))
                part = token_distillation_loss(logits, targets=targets[i:i + chunk], **teacher.chunk(i, i + chunk),
                                               **options)
                if any(need):
                    (g,) = torch.autograd.grad(part.total, logits)
            sums += torch.stack([part.total.detach(), part.ce, part.kd]).to(sums.dtype)
            if any(need):
                g = g.to(acc)
                if need[0] and scale == 1.0:
                    grad_h[i:i + chunk] = g.to(compute_dtype).matmul(w)
                elif need[0]:
                    grad_h[i:i + chunk] = (g * scale).to(compute_dtype).matmul(w).to(acc) / scale
                if need[1]:
                    grad_w[:vocab].addmm_(g.t(), h.to(acc))
                if need[2]:
                    grad_b[:vocab] += g.sum(0)
            del logits, part
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.need, ctx.dtypes = need, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums[1:]

    @staticmethod
    def backward(ctx, grad_total, _grad_parts):
        # grad_total is 1 for loss.backward(), or the loss scale under fp16 (GradScaler): the fp32 gradients are
        # multiplied by it first and cast to the parameters' dtypes after, so nothing underflows on the way.
        unit = bool(torch.equal(grad_total, torch.ones_like(grad_total)))
        stored = iter(ctx.saved_tensors)
        grads = [(next(stored) if unit else next(stored) * grad_total) if n else None for n in ctx.need]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


class _Teacher:
    """The teacher's side of one chunk: logits, hidden states + output layer, or top-k."""

    def __init__(self, logits=None, hidden=None, weight=None, bias=None, topk_ids=None, topk_logprobs=None,
                 tail_mass=None, vocab=None, dtype=None):
        self.logits, self.hidden, self.weight, self.bias = logits, hidden, weight, bias
        self.topk_ids, self.topk_logprobs, self.tail_mass, self.vocab, self.dtype = \
            topk_ids, topk_logprobs, tail_mass, vocab, dtype

    def chunk(self, i: int, j: int) -> dict:
        if self.topk_ids is not None:
            tail = None if self.tail_mass is None else self.tail_mass[i:j]
            return {"teacher_logits": None, "teacher_topk_ids": self.topk_ids[i:j],
                    "teacher_topk_logprobs": self.topk_logprobs[i:j], "teacher_tail_mass": tail}
        if self.logits is not None:
            return {"teacher_logits": self.logits[i:j, :self.vocab]}
        if self.hidden is None:
            return {"teacher_logits": None}
        with torch.no_grad():
            w = self.weight[:self.vocab]
            b = None if self.bias is None else self.bias[:self.vocab]
            h = self.hidden[i:j]
            if self.dtype is not None:
                h, w, b = h.to(self.dtype), w.to(self.dtype), None if b is None else b.to(self.dtype)
            return {"teacher_logits": F.linear(h, w, b)}


def chunked_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                              *, alpha: float, temperature: float, divergence: str = "forward_kl",
                              beta: float = 0.5, skew: float = 0.1, student_bias: Optional[torch.Tensor] = None,
                              teacher_logits: Optional[torch.Tensor] = None,
                              teacher_hidden: Optional[torch.Tensor] = None,
                              teacher_weight: Optional[torch.Tensor] = None,
                              teacher_bias: Optional[torch.Tensor] = None,
                              teacher_topk_ids: Optional[torch.Tensor] = None,
                              teacher_topk_logprobs: Optional[torch.Tensor] = None,
                              teacher_tail_mass: Optional[torch.Tensor] = None,
                              vocab_size: Optional[int] = None, normalizer: Optional[float] = None,
                              chunk_size: Optional[int] = None,
                              compute_dtype: Optional[torch.dtype] = None) -> DistillationLoss:
    """`token_distillation_loss` from the student's hidden states, never holding all (N, V) logits.

    The student's logits are ``student_hidden @ student_weight.T (+ student_bias)``. The N tokens are
    walked in chunks of `chunk_size`; for each chunk the logits are built, the CE and divergence
    terms and their gradients with respect to the hidden states and the output layer are computed,
    and the chunk's logits are freed. Peak memory is a few (chunk_size, V) tensors plus the weight
    gradient, instead of several (N, V) ones. Value and gradients equal the plain path's (same
    float32 arithmetic, summed in another order).

    Args:
        student_hidden: ``(N, H)`` final hidden states (after the final norm) at the answer positions.
        student_weight: ``(V, H)`` the output layer's weight (tied or not); `student_bias` ``(V,)``.
        targets: ``(N,)`` token ids to predict.
        teacher_logits: ``(N, V')`` teacher logits; or `teacher_hidden` ``(N, H')`` with
            `teacher_weight` ``(V', H')`` (and `teacher_bias`), so the teacher's logits are also
            built a chunk at a time; or `teacher_topk_ids` / `teacher_topk_logprobs` ``(N, K)`` and
            `teacher_tail_mass` ``(N,)``.
        chunk_size: tokens per chunk; default `auto_chunk_size(V, device)`.
        compute_dtype: dtype of the output-layer matmuls (default: the hidden states' dtype, e.g.
            bfloat16 under autocast); the loss itself is always computed in float32, and the gradients
            are kept in float32 (scaled before the one 16-bit matmul), so fp16 gives fp32's gradients.
        alpha, temperature, divergence, beta, skew, vocab_size, normalizer: as in `distillation_loss`.
    """
    check_loss_args(alpha, temperature, divergence, beta, skew)
    n, vocab = targets.numel(), student_weight.shape[0]
    given = [teacher_logits is not None, teacher_hidden is not None or teacher_weight is not None,
             teacher_topk_ids is not None or teacher_topk_logprobs is not None]
    if sum(given) > 1 or (sum(given) == 0 and alpha != 1.0):
        raise ValueError("Give the teacher as exactly one of: teacher_logits, teacher_hidden + teacher_weight, or "
                         "teacher_topk_ids + teacher_topk_logprobs (only alpha=1, CE alone, needs no teacher).")
    if given[1] and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("A teacher given by hidden states needs both teacher_hidden and teacher_weight.")
    if not any(given):
        teacher_weight = None
    if student_hidden.shape[0] != n:
        raise ValueError(f"student_hidden has {student_hidden.shape[0]} rows for {n} targets.")
    t_vocab = (teacher_logits.shape[-1] if given[0] else teacher_weight.shape[0] if given[1] else vocab)
    if vocab_size is None and t_vocab != vocab:
        raise ValueError(
            f"Student output layer has {vocab} rows, the teacher's {t_vocab}. If both use one tokenizer and only the "
            "padding differs, pass vocab_size=len(tokenizer); different tokenizers need sequence-level distillation.")
    use = vocab_size or vocab
    if use > min(vocab, t_vocab):
        raise ValueError(f"vocab_size={use} exceeds an output layer ({vocab} / {t_vocab} rows): pass len(tokenizer).")
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_hidden.sum() * 0.0 + student_weight.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), zero.detach())
    teacher = _Teacher(teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_topk_ids,
                       teacher_topk_logprobs, teacher_tail_mass, use,
                       None if teacher_weight is None else torch.promote_types(teacher_weight.dtype,
                                                                               teacher_hidden.dtype))
    if given[2]:
        check_topk_ids(teacher_topk_ids, use)  # once here, not in every chunk (each check is a host sync)
    options = dict(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                   normalizer=denom, compute_dtype=compute_dtype or student_hidden.dtype, check_ids=False,
                   chunk_size=int(chunk_size or auto_chunk_size(use, student_hidden.device.type)), vocab=use)
    if options["chunk_size"] < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: use a positive number of tokens (or None for automatic).")
    total, parts = _ChunkedLoss.apply(student_hidden, student_weight, student_bias, targets, teacher, options)
    return DistillationLoss(total, parts[0], parts[1])
