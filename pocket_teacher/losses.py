"""Distillation losses as pure tensor functions.

One convention everywhere (see DESIGN.md):

    L = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

- causal shift as in transformers: ``logits[:, t]`` predicts ``labels[:, t + 1]``;
- only positions whose label is not ``ignore_index`` count, and both terms are means over them;
- no valid token: every term is a zero that still backpropagates (never NaN).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class DistillationLoss(NamedTuple):
    """The total loss and its two parts (all scalar tensors; `total` carries the gradient)."""

    total: torch.Tensor  # alpha * ce + (1 - alpha) * kd
    ce: torch.Tensor  # hard-label cross-entropy at T = 1
    kd: torch.Tensor  # T^2 * KL(teacher_T || student_T)


def _check_hyper(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: use a value in [0, 1] (1 = plain CE, 0 = pure distillation).")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: use a value > 0 (1 = unchanged logits).")


def token_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                            *, alpha: float, temperature: float,
                            normalizer: Optional[float] = None) -> DistillationLoss:
    """The hybrid loss over already-selected answer tokens.

    Args:
        student_logits: ``(N, V)`` student logits at the N positions that predict a target.
        teacher_logits: ``(N, V)`` teacher logits at the same positions (no gradient needed).
        targets: ``(N,)`` token ids those positions predict.
        alpha: weight of the CE term; 1 = plain fine-tuning, 0 = pure distillation.
        temperature: T, applied to both logits inside the KL only; the KL is multiplied by T^2.
        normalizer: divide the summed per-token terms by this instead of N (e.g. the number of
            answer tokens in the whole accumulated batch, so micro-batches add up exactly).

    Returns:
        DistillationLoss of scalars, computed in at least float32 whatever the logits' dtype.
    """
    _check_hyper(alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ. "
            "Teacher and student must share one tokenizer and vocabulary (see models.check_vocab_compatible).")
    n = targets.numel()
    denom = float(normalizer) if normalizer is not None else float(n)
    if n == 0 or denom == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), zero.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 logits are upcast
    s = student_logits.to(dtype)
    ce = F.cross_entropy(s, targets, reduction="sum") / denom
    # At alpha = 1 the KD term is still reported (to monitor the gap to the teacher) but carries no gradient.
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        kd = (log_p.exp() * (log_p - log_q)).sum() * (temperature ** 2) / denom
    total = alpha * ce + (1.0 - alpha) * kd
    return DistillationLoss(total, ce, kd)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      alpha: float, temperature: float, ignore_index: int = -100,
                      normalizer: Optional[float] = None) -> DistillationLoss:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` over the unmasked tokens.

    Args:
        student_logits: ``(B, L, V)`` student logits.
        teacher_logits: ``(B, L, V)`` teacher logits for the same input ids.
        labels: ``(B, L)`` input ids with ``ignore_index`` on prompt and padding. Causal shift:
            ``logits[:, t]`` is scored against ``labels[:, t + 1]``.
        alpha: 1 = plain CE fine-tuning, 0 = pure distillation.
        temperature: T > 0 softens both distributions in the KL term only (CE uses T = 1); the
            KL is multiplied by T^2 so its gradients keep the scale of the CE's (Hinton et al. 2015).
        ignore_index: label value of tokens that never count.
        normalizer: see `token_distillation_loss` (default: the number of unmasked tokens).

    Returns:
        DistillationLoss(total, ce, kd): scalar means over the unmasked target tokens; all zero
        (with a gradient path) when no token is unmasked.
    """
    if student_logits.dim() != 3 or labels.dim() != 2 or student_logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, L, V) and labels (B, L); got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    return token_distillation_loss(student_logits[:, :-1][mask], teacher_logits[:, :-1][mask], shifted[mask],
                                   alpha=alpha, temperature=temperature, normalizer=normalizer)
