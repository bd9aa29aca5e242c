"""pocket_teacher.train: schedule, accumulation, and that training on the tiny preset learns."""

import copy
import math

import pytest
import torch

from pocket_teacher.config import apply_overrides, get_preset
from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
from pocket_teacher.models import derive_student
from pocket_teacher.train import distill, lr_factor


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_split():
    from pocket_teacher.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(get_preset("tiny").teacher.tiny.vocab_size)
    examples, _ = load_gsm_symbolic(16, seed=3)
    return tokenize_examples(examples, tok, max_length=384), tok


def _run(teacher, split, tok, **overrides):
    cfg = apply_overrides(get_preset("tiny"), overrides)
    student = derive_student(teacher, num_layers=2)
    result = distill(student, teacher, split, cfg, tok.pad_token_id, progress=False)
    return student, result


def test_training_lowers_the_loss(tiny_teacher, tiny_split):
    split, tok = tiny_split
    _, result = _run(tiny_teacher, split, tok, **{"train.max_steps": 12, "train.lr": 3e-3})
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    row = result.history[-1]
    assert {"step", "loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s"} <= set(row)
    assert row["loss"] == pytest.approx(0.5 * row["ce"] + 0.5 * row["kd"], rel=1e-5)


def test_teacher_is_untouched(tiny_teacher, tiny_split):
    split, tok = tiny_split
    before = copy.deepcopy(tiny_teacher.state_dict())
    _run(tiny_teacher, split, tok, **{"train.max_steps": 2})
    for key, value in tiny_teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_accumulation_matches_one_big_batch(tiny_teacher, tiny_split):
    """Token-weighted: 1 x batch 8 and 4 x batch 2 of the same rows give the same loss and gradient.

    (Weights after one AdamW step are not compared: Adam turns float noise in near-zero gradients into
    +-lr updates. The clip threshold is set so high that it only measures the gradient norm.)"""
    split, tok = tiny_split
    common = {"train.max_steps": 1, "train.warmup_steps": 0, "train.max_grad_norm": 1e9}
    _, ra = _run(tiny_teacher, split, tok, **common, **{"train.batch_size": 8, "train.grad_accum": 1})
    _, rb = _run(tiny_teacher, split, tok, **common, **{"train.batch_size": 2, "train.grad_accum": 4})
    _, rc = _run(tiny_teacher, split, tok, **common, **{"train.batch_size": 4, "train.grad_accum": 1})
    assert ra.history[0]["loss"] == pytest.approx(rb.history[0]["loss"], rel=1e-5)
    assert ra.history[0]["grad_norm"] == pytest.approx(rb.history[0]["grad_norm"], rel=1e-4)
    assert ra.history[0]["answer_tokens"] == rb.history[0]["answer_tokens"] > rc.history[0]["answer_tokens"]


def test_chunked_and_full_loss_give_the_same_training(tiny_teacher, tiny_split):
    """The default chunked loss is exact: the same loss curve and gradient norms as the plain path."""
    split, tok = tiny_split
    common = {"train.max_steps": 3, "train.warmup_steps": 0, "train.batch_size": 4}
    _, chunked = _run(tiny_teacher, split, tok, **common, **{"loss.implementation": "chunked", "loss.chunk_size": 16})
    _, full = _run(tiny_teacher, split, tok, **common, **{"loss.implementation": "full"})
    _, auto = _run(tiny_teacher, split, tok, **common)
    assert chunked.loss_implementation == auto.loss_implementation == "chunked" and full.loss_implementation == "full"
    for a, b in zip(chunked.history, full.history):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_kl", "tvd"])
def test_every_divergence_trains(tiny_teacher, tiny_split, divergence):
    split, tok = tiny_split
    _, result = _run(tiny_teacher, split, tok, **{"train.max_steps": 2, "loss.divergence": divergence})
    assert all(math.isfinite(h["loss"]) and h["kd"] >= 0 for h in result.history)


def test_chunked_request_on_a_softcapped_student_is_refused(tiny_teacher, tiny_split):
    split, tok = tiny_split
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 1, "loss.implementation": "chunked"})
    student = derive_student(tiny_teacher, num_layers=2)
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="loss.implementation=full"):
        distill(student, tiny_teacher, split, cfg, tok.pad_token_id, progress=False)
    for fix in ("full", "auto"):  # the advice, followed
        fixed = apply_overrides(cfg, {"loss.implementation": fix})
        assert distill(student, tiny_teacher, split, fixed, tok.pad_token_id, progress=False).history


def test_no_teacher_for_a_distillation_term_names_the_fix_and_plain_fine_tuning_runs(tiny_teacher, tiny_split):
    split, tok = tiny_split
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 2})
    student = derive_student(tiny_teacher, num_layers=2)
    with pytest.raises(ValueError, match=r"No teacher and no teacher cache, but loss.alpha=0.5.*set loss.alpha=1"):
        distill(student, None, split, cfg, tok.pad_token_id, progress=False)
    result = distill(student, None, split, apply_overrides(cfg, {"loss.alpha": 1.0}), tok.pad_token_id,
                     progress=False)  # the advice, followed
    assert len(result.history) == 2 and all(h["kd"] is None for h in result.history)


def test_gradient_checkpointing_on_a_model_without_it_names_the_fix(tiny_teacher, tiny_split):
    from pocket_teacher.train import enable_gradient_checkpointing

    split, tok = tiny_split
    student = derive_student(tiny_teacher, num_layers=2)
    student.supports_gradient_checkpointing = False  # as some transformers architectures are
    with pytest.raises(ValueError, match="does not support it in transformers; set it to false"):
        enable_gradient_checkpointing(student)
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 1, "train.gradient_checkpointing": False})
    assert distill(student, tiny_teacher, split, cfg, tok.pad_token_id, progress=False).history  # followed


def test_gradient_checkpointing_gives_the_same_training(tiny_teacher, tiny_split):
    """Recomputing each layer in backward changes memory, not the maths: same losses and gradient norms."""
    split, tok = tiny_split
    _, plain = _run(tiny_teacher, split, tok, **{"train.max_steps": 3})
    student, ckpt = _run(tiny_teacher, split, tok, **{"train.max_steps": 3, "train.gradient_checkpointing": True})
    for a, b in zip(plain.history, ckpt.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert not student.is_gradient_checkpointing and student.config.use_cache  # switched off after training


def test_8bit_adamw_trains(tiny_teacher, tiny_split):
    pytest.importorskip("bitsandbytes")
    split, tok = tiny_split
    _, result = _run(tiny_teacher, split, tok, **{"train.max_steps": 12, "train.lr": 3e-3,
                                                  "train.optimizer": "adamw_8bit"})
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_fp16_mixed_precision_on_cpu_is_refused(tiny_teacher, tiny_split):
    from pocket_teacher.models import ModelLoadError

    split, tok = tiny_split
    with pytest.raises(ModelLoadError, match="fp16 needs a CUDA GPU"):
        _run(tiny_teacher, split, tok, **{"train.max_steps": 1, "train.mixed_precision": "fp16"})
    _, result = _run(tiny_teacher, split, tok, **{"train.max_steps": 1})
    assert result.mixed_precision == "no"


def test_an_fsdp_gathered_state_loads_into_a_whole_student(tiny_teacher):
    """Under FSDP the prepared module's full state dict (gathered on process 0) is keyed like the DistillStep
    wrapper ("model." first); the unsharded copy built from it equals the trained student, tied weights included."""
    from pocket_teacher.train import DistillStep, unsharded_copy

    student = derive_student(tiny_teacher, num_layers=2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    wrapped = DistillStep(student, get_preset("tiny").loss, "chunked").state_dict()
    assert all(k.startswith("model.") for k in wrapped)
    copy_ = unsharded_copy(student, wrapped)
    for (name, a), (_, b) in zip(student.state_dict().items(), copy_.state_dict().items()):
        assert torch.equal(a, b), name
    assert copy_.get_output_embeddings().weight.data_ptr() == copy_.get_input_embeddings().weight.data_ptr()
    with pytest.raises(RuntimeError, match="does not match its architecture"):
        unsharded_copy(student, {k: v for k, v in wrapped.items() if "layers.1." not in k})


def test_adamw_is_fused_where_the_training_runs_on_the_cpu():
    """make_optimizer: the fused AdamW kernel on the CPU (one pass per tensor instead of a dozen elementwise ops);
    the default elsewhere (a GPU run's student is still on the host when its optimizer is made)."""
    from pocket_teacher.config import get_preset
    from pocket_teacher.train import make_optimizer

    model, tcfg = torch.nn.Linear(4, 4), get_preset("tiny").train
    assert make_optimizer(model, tcfg, "cpu").defaults["fused"] is True
    assert not make_optimizer(model, tcfg, "cuda").defaults.get("fused")
