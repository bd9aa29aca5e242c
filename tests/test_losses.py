"""pocket_teacher.losses: the hybrid loss against math identities and a plain reference."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pocket_teacher.config import LossConfig
from pocket_teacher.losses import (TeacherHidden, TeacherLogits, TeacherTopK, distillation_loss,
                                   token_distillation_loss)

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
    got = distillation_loss(student, labels, TeacherLogits(teacher), LossConfig(alpha=alpha, temperature=T))
    want = _reference(student, teacher, labels, alpha, T)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)


def test_identical_logits_give_zero_kd():
    student, _, labels = _inputs()
    out = distillation_loss(student, labels, TeacherLogits(student.detach().clone()),
                            LossConfig(alpha=0.5, temperature=2.0))
    assert abs(out.kd.item()) < 1e-10


def test_alpha_one_equals_cross_entropy():
    student, teacher, labels = _inputs()
    out = distillation_loss(student, labels, TeacherLogits(teacher), LossConfig(alpha=1.0, temperature=3.0))
    ce = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.total, ce, rtol=1e-6, atol=1e-7)


def test_masked_tokens_change_nothing():
    student, teacher, labels = _inputs()
    spec = LossConfig(alpha=0.5, temperature=2.0)
    base = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    shifted = labels[:, 1:] == -100
    s2, t2 = student.detach().clone(), teacher.clone()
    s2[:, :-1][shifted] = torch.randn_like(s2[:, :-1][shifted]) * 100  # garbage where nothing is scored
    t2[:, :-1][shifted] = torch.randn_like(t2[:, :-1][shifted]) * 100
    s2[:, -1] = 1e4  # the last position predicts nothing
    out = distillation_loss(s2, labels, TeacherLogits(t2), spec)
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
        token_distillation_loss(student, targets, TeacherLogits(teacher),
                                LossConfig(alpha=0.0, temperature=T)).total.backward()
        norms[T] = student.grad.norm().item()
    # For T much larger than the logit gaps, grad ~ (z_s - z_t) / V / T^0: roughly constant with T^2 scaling,
    # whereas without it the gradient would shrink by T^2 (16x from 2 to 8, 16x again to 32).
    assert 0.5 < norms[8.0] / norms[32.0] < 2.0
    assert 0.3 < norms[2.0] / norms[8.0] < 3.0
    out = token_distillation_loss(student, targets, TeacherLogits(teacher), LossConfig(alpha=0.0, temperature=4.0))
    p, q = F.softmax(teacher / 4, -1), F.log_softmax(student / 4, -1)
    torch.testing.assert_close(out.kd, 16 * (p * (p.log() - q)).sum(-1).mean())


def test_all_masked_is_zero_with_finite_gradient():
    student, teacher, labels = _inputs()
    labels[:] = -100
    out = distillation_loss(student, labels, TeacherLogits(teacher), LossConfig(alpha=0.5, temperature=2.0))
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.kd.item() == 0.0
    out.total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() == 0


def test_normalizer_makes_micro_batches_add_up():
    student, teacher, labels = _inputs()
    spec = LossConfig(alpha=0.4, temperature=2.0)
    full = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    n = int((labels[:, 1:] != -100).sum())
    parts = [distillation_loss(student[i:i + 1], labels[i:i + 1], TeacherLogits(teacher[i:i + 1]), spec,
                               normalizer=n) for i in range(B)]
    torch.testing.assert_close(sum(p.total for p in parts), full.total)


@pytest.mark.parametrize("bad,message", [
    ({"alpha": 1.5, "temperature": 1.0}, r"^loss\.alpha=1\.5 is invalid: use a value in \[0, 1\]"),
    ({"alpha": 0.5, "temperature": 0.0}, r"^loss\.temperature=0\.0 is invalid: use a temperature > 0")])
def test_bad_hyperparameters_raise(bad, message):
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, labels, TeacherLogits(teacher), LossConfig(**bad))


def test_vocab_mismatch_raises():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="tokenizer"):
        distillation_loss(student, labels, TeacherLogits(teacher[..., :-1]), LossConfig(alpha=0.5, temperature=1.0))


def test_bf16_logits_are_computed_in_fp32():
    student, teacher, labels = _inputs(dtype=torch.float32)
    spec = LossConfig(alpha=0.5, temperature=2.0)
    ref = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    low = distillation_loss(student.bfloat16(), labels, TeacherLogits(teacher.bfloat16()), spec)
    assert low.total.dtype == torch.float32 and math.isclose(low.total.item(), ref.total.item(), rel_tol=0.05)


# -- the divergence family ------------------------------------------------------------------------------

from pocket_teacher.losses import (DIVERGENCES, chunked_distillation_loss,  # noqa: E402
                                   divergence_per_token, topk_buckets)


def _textbook(p, q, divergence, beta=0.5, skew=0.1):
    """The definitions, one distribution pair at a time, written as plainly as possible."""
    def kl(a, b):
        return sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(a, b) if x > 0)
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if divergence == "skew_kl":
        return kl(p, [skew * x + (1 - skew) * y for x, y in zip(p, q)])
    if divergence == "skew_reverse_kl":
        return kl(q, [skew * y + (1 - skew) * x for x, y in zip(p, q)])
    if divergence == "tvd":
        return 0.5 * sum(abs(float(x) - float(y)) for x, y in zip(p, q))
    raise AssertionError(divergence)


def _pair(n=5, v=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, v, generator=g, dtype=torch.float64) * 2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta,skew", [(0.5, 0.1), (0.2, 0.5), (0.9, 0.9)])
def test_divergence_matches_textbook(divergence, beta, skew):
    t, s = _pair()
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    got = divergence_per_token(log_p, log_q, divergence, beta=beta, skew=skew)
    want = [_textbook(log_p[i].exp(), log_q[i].exp(), divergence, beta, skew) for i in range(t.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert (got > 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero_for_every_divergence(divergence):
    t, _ = _pair()
    log_p = F.log_softmax(t, -1)
    assert divergence_per_token(log_p, log_p.clone(), divergence).abs().max() < 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_loss_with_each_divergence_matches_reference(divergence):
    student, teacher, labels = _inputs()
    got = distillation_loss(student, labels, TeacherLogits(teacher),
                            LossConfig(alpha=0.25, temperature=1.5, divergence=divergence, beta=0.3, skew=0.2))
    terms = []
    for b in range(B):
        for t in range(L - 1):
            if labels[b, t + 1] != -100:
                p, q = F.softmax(teacher[b, t] / 1.5, -1), F.softmax(student[b, t].detach() / 1.5, -1)
                terms.append(_textbook(p, q, divergence, 0.3, 0.2))
    torch.testing.assert_close(got.kd.item(), 1.5 ** 2 * sum(terms) / len(terms), rtol=1e-10, atol=1e-12)


def test_jsd_reaches_forward_and_reverse_kl_continuously():
    t, s = _pair()
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    fwd, rev = divergence_per_token(log_p, log_q, "forward_kl"), divergence_per_token(log_p, log_q, "reverse_kl")
    torch.testing.assert_close(divergence_per_token(log_p, log_q, "jsd", beta=0.0), fwd)
    torch.testing.assert_close(divergence_per_token(log_p, log_q, "jsd", beta=1.0), rev)
    for eps in (1e-3, 1e-5):
        near0 = divergence_per_token(log_p, log_q, "jsd", beta=eps)
        near1 = divergence_per_token(log_p, log_q, "jsd", beta=1 - eps)
        assert (near0 - fwd).abs().max() < 50 * eps * fwd.abs().max()
        assert (near1 - rev).abs().max() < 50 * eps * rev.abs().max()
    mid = divergence_per_token(log_p, log_q, "jsd", beta=0.5)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    js = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    torch.testing.assert_close(mid, 4 * js)  # beta = 0.5 is 4 x the Jensen-Shannon divergence


def test_skew_extremes():
    t, s = _pair()
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    torch.testing.assert_close(divergence_per_token(log_p, log_q, "skew_kl", skew=0.0),
                               divergence_per_token(log_p, log_q, "forward_kl"))
    torch.testing.assert_close(divergence_per_token(log_p, log_q, "skew_reverse_kl", skew=0.0),
                               divergence_per_token(log_p, log_q, "reverse_kl"))
    near_one = divergence_per_token(log_p, log_q, "skew_kl", skew=0.999)
    assert near_one.max() < 1e-2 * divergence_per_token(log_p, log_q, "forward_kl").min()
    # Skewing bounds the loss where the student gives a teacher token (almost) no mass.
    log_q_bad = log_q.clone()
    log_q_bad[:, 0] = -1e4
    log_q_bad = log_q_bad.log_softmax(-1)
    assert divergence_per_token(log_p, log_q_bad, "skew_kl", skew=0.1).max() <= -math.log(0.1) + 1e-9


def test_tvd_is_bounded():
    t, s = _pair()
    d = divergence_per_token(F.log_softmax(t * 50, -1), F.log_softmax(s * 50, -1), "tvd")
    assert ((d >= 0) & (d <= 1)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_gives_zero_and_finite_gradients_for_each_divergence(divergence):
    student, teacher, labels = _inputs()
    labels[:] = -100
    out = distillation_loss(student, labels, TeacherLogits(teacher),
                            LossConfig(alpha=0.5, temperature=2.0, divergence=divergence))
    out.total.backward()
    assert out.total.item() == 0.0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_and_padded_positions_have_no_effect_for_each_divergence(divergence):
    student, teacher, labels = _inputs()
    spec = LossConfig(alpha=0.5, temperature=2.0, divergence=divergence)
    base = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    # Append a padded row and padded columns full of garbage: nothing changes.
    pad_s = torch.cat([student.detach(), 1e3 * torch.randn(1, L, V, dtype=student.dtype)], 0)
    pad_t = torch.cat([teacher, -1e3 * torch.randn(1, L, V, dtype=teacher.dtype)], 0)
    pad_l = torch.cat([labels, torch.full((1, L), -100)], 0)
    out = distillation_loss(pad_s, pad_l, TeacherLogits(pad_t), spec)
    torch.testing.assert_close(out.total, base.total.detach())


def test_bad_divergence_arguments_name_the_argument():
    student, teacher, labels = _inputs()
    for kwargs, name in [({"divergence": "kl"}, "divergence"), ({"divergence": "jsd", "beta": 1.2}, "beta"),
                         ({"divergence": "skew_kl", "skew": 1.0}, "skew")]:
        with pytest.raises(ValueError, match=rf"^loss\.{name}="):
            distillation_loss(student, labels, TeacherLogits(teacher), LossConfig(alpha=0.5, temperature=1.0, **kwargs))


# -- padded vocabularies -----------------------------------------------------------------------------------

def test_padded_output_rows_never_take_mass():
    student, teacher, labels = _inputs()
    spec = LossConfig(alpha=0.5, temperature=2.0)
    base = distillation_loss(student, labels, TeacherLogits(teacher), spec, vocab_size=V)
    # The student pads 3 rows, the teacher 5, with large logits on the padding: sliced away.
    s = torch.cat([student.detach(), torch.full((B, L, 3), 50.0, dtype=student.dtype)], -1).requires_grad_()
    t = torch.cat([teacher, torch.full((B, L, 5), 80.0, dtype=teacher.dtype)], -1)
    out = distillation_loss(s, labels, TeacherLogits(t), spec, vocab_size=V)
    torch.testing.assert_close(out.total, base.total.detach())
    out.total.backward()
    assert s.grad[..., V:].abs().sum() == 0
    with pytest.raises(ValueError, match="vocab_size=len\\(tokenizer\\)"):
        distillation_loss(s, labels, TeacherLogits(t), spec)
    with pytest.raises(ValueError, match="exceeds"):
        distillation_loss(s, labels, TeacherLogits(t), spec, vocab_size=V + 4)


# -- top-k teacher ---------------------------------------------------------------------------------------

def _topk(teacher, k):
    log_p = F.log_softmax(teacher, -1)
    lp, ids = log_p.topk(k, dim=-1)
    return ids, lp


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_with_k_equal_vocab_reproduces_full_logits(divergence, T):
    student, teacher, labels = _inputs()
    spec = LossConfig(alpha=0.3, temperature=T, divergence=divergence)
    full = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    g_full, = torch.autograd.grad(full.total, student)
    ids, lp = _topk(teacher, V)
    top = distillation_loss(student, labels, TeacherTopK(ids, lp), spec)
    g_top, = torch.autograd.grad(top.total, student)
    torch.testing.assert_close(top.total, full.total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_top, g_full, rtol=1e-9, atol=1e-12)


def test_topk_forward_kl_matches_bucket_formula_with_tail():
    t, s = _pair(n=4, v=12)
    k = 3
    ids, lp = _topk(t, k)
    log_p, log_q = topk_buckets(s, TeacherTopK(ids, lp))
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    for i in range(4):
        top = ids[i].tolist()
        p_tail, q_tail = 1 - p[i, top].sum(), 1 - q[i, top].sum()
        want = sum(p[i, j] * math.log(p[i, j] / q[i, j]) for j in top) + p_tail * math.log(p_tail / q_tail)
        got = (log_p[i].exp() * (log_p[i] - log_q[i])).sum()
        assert abs(float(got) - float(want)) < 1e-10
    # An explicit tail mass is used as given; the bucket distributions are normalised.
    log_p2, _ = topk_buckets(s, TeacherTopK(ids, lp, tail=1 - lp.exp().sum(-1)))
    torch.testing.assert_close(log_p2, log_p)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_topk_rejects_ids_outside_the_vocabulary():
    t, s = _pair()
    ids, lp = _topk(t, 3)
    with pytest.raises(ValueError, match="rebuild"):
        topk_buckets(s[:, :4], TeacherTopK(ids.clamp_min(5), lp))


# -- chunked path ---------------------------------------------------------------------------------------------

def _hidden_inputs(n=37, h=16, v=50, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    t_hidden = torch.randn(n, h + 4, generator=g, dtype=dtype)
    t_weight = torch.randn(v, h + 4, generator=g, dtype=dtype)
    return hidden, weight, t_hidden, t_weight, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_equals_plain_in_value_and_gradients(divergence, chunk):
    hidden, weight, t_hidden, t_weight, y = _hidden_inputs()
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    spec = LossConfig(alpha=0.3, temperature=2.0, divergence=divergence, beta=0.4, skew=0.2)
    plain = token_distillation_loss(F.linear(hidden, weight, bias), y, TeacherLogits(t_hidden @ t_weight.T), spec,
                                    normalizer=50.0)
    want = torch.autograd.grad(plain.total, [hidden, weight, bias])
    chunked = chunked_distillation_loss(hidden, weight, y, TeacherHidden(t_hidden, t_weight),
                                        dataclasses.replace(spec, chunk_size=chunk), student_bias=bias,
                                        normalizer=50.0)
    got = torch.autograd.grad(chunked.total, [hidden, weight, bias])
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_accepts_teacher_logits_topk_and_padded_rows():
    hidden, weight, t_hidden, t_weight, y = _hidden_inputs()
    t_logits = t_hidden @ t_weight.T
    spec = LossConfig(alpha=0.5, temperature=1.0)
    by7 = dataclasses.replace(spec, chunk_size=7)
    plain = token_distillation_loss(hidden @ weight.T, y, TeacherLogits(t_logits), spec)
    from_logits = chunked_distillation_loss(hidden, weight, y, TeacherLogits(t_logits), by7)
    ids, lp = _topk(t_logits, 50)
    from_topk = chunked_distillation_loss(hidden, weight, y, TeacherTopK(ids, lp), by7)
    padded_w = torch.cat([weight.detach(), torch.full((6, 16), 3.0, dtype=weight.dtype)]).requires_grad_()
    padded = chunked_distillation_loss(hidden, padded_w, y, TeacherLogits(t_logits), by7, vocab_size=50)
    for out in (from_logits, from_topk, padded):
        torch.testing.assert_close(out.total, plain.total.detach(), rtol=1e-10, atol=1e-12)
    padded.total.backward()
    assert padded_w.grad[50:].abs().sum() == 0 and padded_w.grad[:50].abs().sum() > 0
    with pytest.raises(ValueError, match="sequence-level"):
        chunked_distillation_loss(hidden, padded_w, y, TeacherLogits(t_logits), spec)
    with pytest.raises(ValueError, match="No teacher given but alpha=0.5"):
        chunked_distillation_loss(hidden, weight, y, None, spec)


def test_chunked_all_masked_and_no_grad():
    hidden, weight, t_hidden, t_weight, y = _hidden_inputs()
    spec = LossConfig(alpha=0.5, temperature=2.0)
    out = chunked_distillation_loss(hidden[:0], weight, y[:0], TeacherLogits((t_hidden @ t_weight.T)[:0]), spec)
    out.total.backward()
    assert out.total.item() == 0.0 and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() == 0
    with torch.no_grad():
        val = chunked_distillation_loss(hidden, weight, y, TeacherHidden(t_hidden, t_weight), spec)
    assert not val.total.requires_grad and torch.isfinite(val.total)


def test_chunked_bf16_matmuls_stay_close_to_fp32():
    hidden, weight, t_hidden, t_weight, y = _hidden_inputs(dtype=torch.float32)
    spec = LossConfig(alpha=0.5, temperature=2.0)
    ref = chunked_distillation_loss(hidden, weight, y, TeacherHidden(t_hidden, t_weight), spec)
    low = chunked_distillation_loss(hidden.bfloat16(), weight, y, TeacherHidden(t_hidden, t_weight), spec)
    assert low.total.dtype == torch.float32 and math.isclose(low.total.item(), ref.total.item(), rel_tol=0.05)
    g_w, = torch.autograd.grad(low.total, weight)
    assert g_w.dtype == torch.float32 and torch.isfinite(g_w).all()


# -- gradient accumulation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_micro_batches_equal_one_big_batch(divergence):
    """Token-weighted: uneven micro-batches (different answer counts) add up to the big batch exactly."""
    g = torch.Generator().manual_seed(7)
    student = torch.randn(4, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, L, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (4, L), generator=g)
    labels[0, :5] = -100  # row 0 has 1 answer token, the others more
    labels[2, :2] = -100
    spec = LossConfig(alpha=0.4, temperature=2.0, divergence=divergence)
    big = distillation_loss(student, labels, TeacherLogits(teacher), spec)
    g_big, = torch.autograd.grad(big.total, student)
    n = int((labels[:, 1:] != -100).sum())
    micro = [distillation_loss(student[i:j], labels[i:j], TeacherLogits(teacher[i:j]), spec, normalizer=n)
             for i, j in ((0, 1), (1, 4))]
    g_micro, = torch.autograd.grad(sum(m.total for m in micro), student)
    torch.testing.assert_close(sum(m.total for m in micro), big.total)
    torch.testing.assert_close(g_micro, g_big)
    # The naive mean of micro-batch means is not the same (why the normalizer exists).
    naive = sum(distillation_loss(student[i:j], labels[i:j], TeacherLogits(teacher[i:j]), spec).total
                for i, j in ((0, 1), (1, 4))) / 2
    assert abs(naive.item() - big.total.item()) > 1e-3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_buckets_of_identical_models_give_zero_at_every_temperature(T, divergence):
    t, _ = _pair(n=4, v=30)
    ids, lp = _topk(t, 5)
    log_p, log_q = topk_buckets(t, TeacherTopK(ids, lp), temperature=T)
    assert divergence_per_token(log_p, log_q, divergence).abs().max() < 1e-10


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_a_seemingly_empty_tail_stays_finite(divergence):
    t, s = _pair(n=4, v=30)
    t[:, 0] = 80.0  # one near-certain token: the top-k mass rounds to 1
    ids, lp = _topk(t, 5)
    s.requires_grad_()
    log_p, log_q = topk_buckets(s, TeacherTopK(ids, lp, tail=torch.zeros(4, dtype=torch.float64)), temperature=2.0)
    d = divergence_per_token(log_p, log_q, divergence)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(s.grad).all()


def test_chunked_fp16_gradients_match_fp32_on_a_realistic_vocabulary():
    """fp16 matmuls must still deliver the soft (teacher-vs-student) gradient: with the loss a mean over N tokens,
    each logit's gradient is ~|p - q| / N, which underflows in fp16 unless scaled before the cast. Rows of tokens
    that are never targets get only that soft gradient."""
    gen = torch.Generator().manual_seed(0)
    n, h, v = 2048, 64, 32768
    hidden = torch.randn(n, h, generator=gen)
    weight = (torch.randn(v, h, generator=gen) * 0.05).requires_grad_()
    t_hidden, t_weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.05
    targets = torch.randint(0, 512, (n,), generator=gen)  # most of the vocabulary is never a target

    def grads(dtype):
        weight.grad = None
        x = hidden.clone().requires_grad_()
        out = chunked_distillation_loss(x, weight, targets, TeacherHidden(t_hidden, t_weight),
                                        LossConfig(alpha=0.5, temperature=2.0, chunk_size=512), compute_dtype=dtype)
        out.total.backward()
        return x.grad, weight.grad.clone()

    (h32, w32), (h16, w16) = grads(torch.float32), grads(torch.float16)
    soft = torch.ones(v, dtype=torch.bool)
    soft[targets.unique()] = False
    assert soft.sum() > 0.95 * v
    for name, a, b in (("hidden", h32, h16), ("soft-only output rows", w32[soft], w16[soft]), ("output", w32, w16)):
        assert float((a - b).norm() / a.norm()) < 0.02, name
    assert float((w16[soft] == 0).float().mean()) < 0.01  # nothing underflowed to zero


def test_chunked_gradients_follow_a_loss_scale():
    """Under fp16 autocast, GradScaler multiplies the loss by S: the stored fp32 gradients are scaled by S
    before they are cast, so scaled gradients / S equal the plain ones."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 16, generator=gen, requires_grad=True)
    weight = torch.randn(100, 16, generator=gen, requires_grad=True)
    teacher = torch.randn(64, 100, generator=gen)
    targets = torch.randint(0, 100, (64,), generator=gen)
    spec = LossConfig(alpha=0.3, temperature=2.0)
    out = chunked_distillation_loss(hidden, weight, targets, TeacherLogits(teacher), spec)
    (out.total * 65536.0).backward()
    scaled = weight.grad.clone() / 65536.0
    weight.grad = None
    chunked_distillation_loss(hidden, weight, targets, TeacherLogits(teacher), spec).total.backward()
    torch.testing.assert_close(scaled, weight.grad)


def test_auto_chunk_size_depends_on_the_device():
    from pocket_teacher.batches import auto_chunk_size

    assert auto_chunk_size(151665, "cuda") >= 1024 and auto_chunk_size(49152, "cuda") % 256 == 0
    assert auto_chunk_size(151665, "cpu") < 100  # CPU: ~32 MiB of logits per chunk, as before


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_nan_in_either_distribution_is_never_turned_into_a_zero(divergence):
    """Exact zeros (-inf log-probabilities) contribute 0 with finite gradients; a NaN, in the teacher's or the
    student's log-probabilities, comes out as NaN, so the training guard stops and reports it."""
    log_p, log_q = torch.log_softmax(torch.randn(3, 6), -1), torch.log_softmax(torch.randn(3, 6), -1)
    log_p[0, 2] = log_q[0, 2] = -math.inf  # a token neither can produce: finite for every divergence
    log_q.requires_grad_()
    clean = divergence_per_token(log_p, log_q, divergence)
    clean.sum().backward()
    assert torch.isfinite(clean).all() and torch.isfinite(log_q.grad).all()
    for which in ("teacher", "student"):
        p, q = log_p.clone(), log_q.detach().clone()
        (p if which == "teacher" else q)[1, 4] = math.nan
        out = divergence_per_token(p, q, divergence)
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), (which, out)
