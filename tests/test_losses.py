"""pocket_teacher.losses: the hybrid loss against math identities and a plain reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from pocket_teacher.losses import distillation_loss, token_distillation_loss

B, L, V = 2, 7, 11


def _inputs(masked_prefix=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, L, V, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, L, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :masked_prefix] = -100
    labels[1, -2:] = -100  # right padding on the second row
    return student, teacher, labels


def _reference(student, teacher, labels, alpha, T):
    """Straightforward loop over positions: the textbook definitions."""
    ce_terms, kl_terms = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1]
            if y == -100:
                continue
            ce_terms.append(-F.log_softmax(student[b, t], -1)[y])
            p = F.softmax(teacher[b, t] / T, -1)
            q = F.softmax(student[b, t] / T, -1)
            kl_terms.append((p * (p.log() - q.log())).sum())
    ce = torch.stack(ce_terms).mean()
    kd = torch.stack(kl_terms).mean() * T * T
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize("alpha,T", [(0.5, 2.0), (0.0, 1.0), (0.3, 4.0), (1.0, 2.0)])
def test_matches_reference(alpha, T):
    student, teacher, labels = _inputs()
    got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=T)
    want = _reference(student, teacher, labels, alpha, T)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)


def test_identical_logits_give_zero_kd():
    student, _, labels = _inputs()
    out = distillation_loss(student, student.detach().clone(), labels, alpha=0.5, temperature=2.0)
    assert abs(out.kd.item()) < 1e-10


def test_alpha_one_equals_cross_entropy():
    student, teacher, labels = _inputs()
    out = distillation_loss(student, teacher, labels, alpha=1.0, temperature=3.0)
    ce = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.total, ce, rtol=1e-6, atol=1e-7)


def test_masked_tokens_change_nothing():
    student, teacher, labels = _inputs()
    base = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    shifted = labels[:, 1:] == -100
    s2, t2 = student.detach().clone(), teacher.clone()
    s2[:, :-1][shifted] = torch.randn_like(s2[:, :-1][shifted]) * 100  # garbage where nothing is scored
    t2[:, :-1][shifted] = torch.randn_like(t2[:, :-1][shifted]) * 100
    s2[:, -1] = 1e4  # the last position predicts nothing
    out = distillation_loss(s2, t2, labels, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(out.total, base.total.detach())


def test_t_squared_scaling():
    """The T^2 factor keeps the soft term's gradient on the hard term's scale as T grows."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 50, generator=g, dtype=torch.float64)
    student = (teacher + 0.1 * torch.randn(64, 50, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (64,), generator=g)
    norms = {}
    for T in (2.0, 8.0, 32.0):
        student.grad = None
        token_distillation_loss(student, teacher, targets, alpha=0.0, temperature=T).total.backward()
        norms[T] = student.grad.norm().item()
    # For T much larger than the logit gaps, grad ~ (z_s - z_t) / V / T^0: roughly constant with T^2 scaling,
    # whereas without it the gradient would shrink by T^2 (16x from 2 to 8, 16x again to 32).
    assert 0.5 < norms[8.0] / norms[32.0] < 2.0
    assert 0.3 < norms[2.0] / norms[8.0] < 3.0
    out = token_distillation_loss(student, teacher, targets, alpha=0.0, temperature=4.0)
    p, q = F.softmax(teacher / 4, -1), F.log_softmax(student / 4, -1)
    torch.testing.assert_close(out.kd, 16 * (p * (p.log() - q)).sum(-1).mean())


def test_all_masked_is_zero_with_finite_gradient():
    student, teacher, labels = _inputs()
    labels[:] = -100
    out = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.kd.item() == 0.0
    out.total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() == 0


def test_normalizer_makes_micro_batches_add_up():
    student, teacher, labels = _inputs()
    full = distillation_loss(student, teacher, labels, alpha=0.4, temperature=2.0)
    n = int((labels[:, 1:] != -100).sum())
    parts = [distillation_loss(student[i:i + 1], teacher[i:i + 1], labels[i:i + 1], alpha=0.4, temperature=2.0,
                               normalizer=n) for i in range(B)]
    torch.testing.assert_close(sum(p.total for p in parts), full.total)


@pytest.mark.parametrize("bad", [{"alpha": 1.5, "temperature": 1.0}, {"alpha": 0.5, "temperature": 0.0}])
def test_bad_hyperparameters_raise(bad):
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="alpha|temperature"):
        distillation_loss(student, teacher, labels, **bad)


def test_vocab_mismatch_raises():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="tokenizer"):
        distillation_loss(student, teacher[..., :-1], labels, alpha=0.5, temperature=1.0)


def test_bf16_logits_are_computed_in_fp32():
    student, teacher, labels = _inputs(dtype=torch.float32)
    ref = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    low = distillation_loss(student.bfloat16(), teacher.bfloat16(), labels, alpha=0.5, temperature=2.0)
    assert low.total.dtype == torch.float32 and math.isclose(low.total.item(), ref.total.item(), rel_tol=0.05)
