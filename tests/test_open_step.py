"""The notebook's "one step, opened up" cell and the custom-divergence hook (pocket_teacher.train.open_step,
Experiment.open_step, Experiment.distil(divergence=...)), on the tiny preset."""

import copy

import pytest
import torch

from pocket_teacher import experiment
from pocket_teacher.losses import divergence_per_token, token_distillation_loss
from pocket_teacher.train import DistillStep, resolve_loss_implementation


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """The tiny experiment up to its teacher cache (what the notebook has built when it reaches section 4c)."""
    out = tmp_path_factory.mktemp("runs")
    built = experiment.Experiment(experiment.configure("tiny", [f"run.out_dir={out}", "eval.baseline=false",
                                                                   "eval.on_policy_preview=0"]), progress=False)
    for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
        getattr(built, method)()
    return built


def _notebook_loss(exp, step, divergence=None):
    """What the notebook cell computes: the package's loss on the opened step's full logits."""
    return token_distillation_loss(step.student_logits, step.batch.targets, step.teacher, exp.cfg.loss,
                                   vocab_size=len(exp.tokenizer), divergence=divergence)


def test_opened_step_shows_the_batch_the_training_step_reads(exp):
    step = exp.open_step(rows=4)
    table = step.mask_table()
    assert len(table) == 4 and list(table["row"]) == step.batch.rows
    assert (table["prompt (masked)"] + table["answer (targets)"] + table["padding"] == step.batch.input_ids.shape[1]
            ).all()
    assert int(table["answer (targets)"].sum()) == len(step.batch.targets) == int(step.batch.select.sum())
    assert step.student_logits.shape == (len(step.batch.targets), len(exp.tokenizer))
    text = step.mask_text(0)
    assert text.startswith("PROMPT") and "ANSWER" in text
    top = step.distributions(position=0, k=5, temperature=exp.cfg.loss.temperature)
    assert len(top) == 5 and top["teacher"].is_monotonic_decreasing and (top["student"] > 0).all()
    assert top["token"][0] == exp.tokenizer.decode([int(step.teacher.ids[0, 0])])  # the cache's likeliest token


def test_opened_step_numbers_equal_the_training_step(exp):
    """The notebook's CE, KD and total (full logits, `token_distillation_loss`) equal what the training step
    computes for the same batch and weights (`DistillStep`, chunked from the hidden states), and the first row
    of a real training history (the opened rows are the tiny preset's whole first batch of 4)."""
    step = exp.open_step(rows=4)
    loss = _notebook_loss(exp, step)
    spec = exp.cfg.loss
    module = DistillStep(copy.deepcopy(exp.student_init), spec,
                         resolve_loss_implementation(exp.student_init, spec.implementation), len(exp.tokenizer))
    b = step.batch
    trained = module(b.input_ids, b.attention_mask, b.select, b.targets, step.teacher, float(len(b.targets)))
    assert module.implementation == "chunked"
    for name in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(loss, name), getattr(trained, name).detach(), rtol=1e-5, atol=1e-6)
    assert float(loss.total) == pytest.approx(spec.alpha * float(loss.ce) + (1 - spec.alpha) * float(loss.kd))
    assert exp.cfg.train.batch_size == 4 and exp.cfg.train.grad_accum == 1
    first = exp.distil(["train.max_steps=1"]).result.history[0]
    assert first["loss"] == pytest.approx(float(loss.total), rel=1e-5)
    assert first["ce"] == pytest.approx(float(loss.ce), rel=1e-5)
    assert first["kd"] == pytest.approx(float(loss.kd), rel=1e-5)


def test_a_divergence_defined_here_is_trained_with(exp):
    """A divergence written in a test (or a notebook cell) reaches the training step: it is called, and the
    history's kd is its value (twice forward KL: at step 1, before any update, exactly twice the named one's)."""
    calls = []

    def doubled_kl(log_p, log_q):
        calls.append(log_p.shape)
        return 2.0 * divergence_per_token(log_p, log_q, "forward_kl")

    plain = exp.distil(["train.max_steps=2", "train.eval_every=2"])
    custom = exp.distil(["train.max_steps=2", "train.eval_every=2"], divergence=doubled_kl)
    assert calls and all(len(shape) == 2 for shape in calls)
    assert custom.divergence is doubled_kl and exp.trained is custom
    assert custom.result.history[0]["kd"] == pytest.approx(2 * plain.result.history[0]["kd"], rel=1e-5)
    assert custom.result.history[0]["ce"] == pytest.approx(plain.result.history[0]["ce"], rel=1e-6)
    assert custom.result.history[1]["eval_kd"] is not None  # the held-out KD is measured with it too
    assert any("doubled_kl" in o for o in custom.overrides)
    step = exp.open_step(rows=4)
    mine = _notebook_loss(exp, step, divergence=doubled_kl)
    assert float(mine.kd) == pytest.approx(2 * float(_notebook_loss(exp, step).kd), rel=1e-6)


def test_a_divergence_that_is_not_a_function_is_refused(exp):
    with pytest.raises(TypeError, match="divergence='tvd': give a function"):
        exp.distil(["train.max_steps=1"], divergence="tvd")
