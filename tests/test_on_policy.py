"""On-policy distillation (train.on_policy): rollouts, the sampled-token estimator, the step schedule, the
off-policy path left exactly as it was, no gradient through sampling, and exact resume."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocket_teacher.checkpoints import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_job import train  # noqa: E402

JOB = Path(__file__).resolve().parent / "_train_job.py"
ON = ["train.max_steps=4", "train.warmup_steps=1", "train.batch_size=2", "train.on_policy=1",
      "train.rollout_max_new_tokens=6", "loss.divergence=reverse_kl"]


def test_on_policy_trains_and_logs_its_rollouts():
    result = train(ON)
    assert [h["policy"] for h in result.history] == ["on"] * 4
    assert all(h["ce"] is None and h["kd"] >= 0 and math.isfinite(h["loss"]) for h in result.history)
    assert all(h["rollouts"] == 2 and 1 <= h["rollout_tokens_mean"] <= 6 for h in result.history)
    assert result.history[0]["loss"] == pytest.approx(result.history[0]["kd"])  # alpha plays no part on rollouts


def test_mixed_runs_the_stated_fraction_evenly():
    result = train([o for o in ON if "on_policy" not in o] + ["train.on_policy=0.5", "train.max_steps=6"])
    assert [h["policy"] for h in result.history] == ["off", "on"] * 3
    assert [h["ce"] is None for h in result.history] == [False, True] * 3


def test_on_policy_zero_is_exactly_the_off_policy_run(monkeypatch):
    off = ["train.max_steps=4", "train.warmup_steps=1", "train.batch_size=2"]
    before = train(off)

    def never(*a, **k):
        raise AssertionError("no rollout may be sampled at train.on_policy=0")
    monkeypatch.setattr("pocket_teacher.train.sample_rollouts", never)
    after = train(off + ["train.on_policy=0", "train.rollout_temperature=0.3", "loss.on_policy_estimator=sampled"])
    assert [h["loss"] for h in after.history] == [h["loss"] for h in before.history]
    assert [h["grad_norm"] for h in after.history] == [h["grad_norm"] for h in before.history]
    assert all("policy" not in h for h in after.history)


def test_rollouts_carry_no_gradient_and_leave_the_global_rng_alone(tiny_teacher, tiny_tokenizer):
    from pocket_teacher.batches import answer_batch
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.generate import prompt_lengths, sample_rollouts

    split = tokenize_examples(load_gsm_symbolic(3, seed=3)[0], tiny_tokenizer, max_length=384)
    batch = answer_batch(split, range(3), tiny_tokenizer.pad_token_id)
    tiny_teacher.train()
    for p in tiny_teacher.parameters():
        p.requires_grad_(True)
    state = torch.get_rng_state()
    first = sample_rollouts(tiny_teacher, batch, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=0, seed=7,
                            max_new_tokens=5)
    assert torch.equal(torch.get_rng_state(), state) and tiny_teacher.training
    again = sample_rollouts(tiny_teacher, batch, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=0, seed=7,
                            max_new_tokens=5)
    assert torch.equal(first.batch.input_ids, again.batch.input_ids)  # the seed decides
    assert all(v.grad_fn is None and not v.requires_grad
               for v in (first.batch.input_ids, first.batch.labels, first.batch.attention_mask))
    assert first.batch.rows == [0, 1, 2]
    starts = prompt_lengths(batch.labels, batch.attention_mask)
    for i, n in enumerate(starts):  # the prompt is kept, the answer replaced by the samples, labelled
        assert first.batch.input_ids[i, :n].tolist() == batch.input_ids[i, :n].tolist()
        assert (first.batch.labels[i, :n] == -100).all()
        sampled = first.batch.labels[i, n:n + first.lengths[i]]
        assert sampled.tolist() == first.batch.input_ids[i, n:n + first.lengths[i]].tolist()


def test_sampled_token_estimator_value_and_unbiased_gradient():
    """The value is T^2 * mean(log q - log p) over the sampled tokens; averaged over many samples from q its
    gradient is the exact reverse-KL gradient."""
    from pocket_teacher.config import LossConfig
    from pocket_teacher.losses import TeacherLogits, divergence_per_token, sampled_token_loss

    torch.manual_seed(0)
    student = torch.randn(1, 5, requires_grad=True)
    teacher = torch.randn(1, 5)
    n = 200_000
    tokens = torch.multinomial(torch.softmax(student.detach(), -1), n, replacement=True)[0]
    out = sampled_token_loss(student.expand(n, 5), tokens, TeacherLogits(teacher.expand(n, 5)),
                             LossConfig(temperature=1.0))
    out.total.backward()
    exact = divergence_per_token(torch.log_softmax(teacher, -1), torch.log_softmax(student, -1), "reverse_kl").sum()
    assert float(out.kd) == pytest.approx(float(exact.detach()), abs=0.02)
    assert float(out.total.detach()) == pytest.approx(float(out.kd))
    estimate = student.grad.clone()
    student.grad = None
    exact.backward()
    torch.testing.assert_close(estimate, student.grad, atol=0.02, rtol=0)
    assert out.ce is None  # no reference on sampled tokens: CE is not measured


def test_sampled_estimator_trains():
    result = train(ON + ["loss.on_policy_estimator=sampled", "loss.implementation=full", "train.rollout_temperature=2"])
    assert all(h["policy"] == "on" and math.isfinite(h["loss"]) for h in result.history)


def test_the_sampled_estimator_is_unbiased_only_from_rollouts_at_the_loss_temperature():
    """E over y ~ q_tau of T^2 (log q_T(y) - log p_T(y)) is T^2 KL(q_T || p_T) only when tau = T: drawn at another
    temperature (or truncated by top_p) the same estimator measures something else."""
    from pocket_teacher.config import LossConfig
    from pocket_teacher.losses import TeacherLogits, divergence_per_token, sampled_token_loss

    torch.manual_seed(0)
    student, teacher, t, n = torch.randn(1, 6) * 2, torch.randn(1, 6) * 2, 2.0, 400_000
    exact = t * t * float(divergence_per_token(torch.log_softmax(teacher / t, -1), torch.log_softmax(student / t, -1),
                                               "reverse_kl").sum())

    def estimate(tau):
        tokens = torch.multinomial(torch.softmax(student / tau, -1), n, replacement=True)[0]
        return float(sampled_token_loss(student.expand(n, 6), tokens, TeacherLogits(teacher.expand(n, 6)),
                                        LossConfig(temperature=t)).kd)

    assert estimate(t) == pytest.approx(exact, abs=0.02)
    assert abs(estimate(1.0) - exact) > 0.1  # the bias the configuration check refuses


def test_the_sampled_estimator_refuses_rollouts_it_would_misestimate_and_its_advice_works():
    from pocket_teacher.config import ConfigError, apply_overrides, get_preset

    base = ["train.on_policy=1", "loss.on_policy_estimator=sampled", "loss.temperature=2"]
    with pytest.raises(ConfigError, match=r"rollout_temperature=1\.0, train\.rollout_top_p=1\.0\. Set "
                                          r"train\.rollout_temperature=2\.0 and train\.rollout_top_p=1"):
        apply_overrides(get_preset("tiny"), base)
    with pytest.raises(ConfigError, match=r"train\.rollout_top_p=0\.9"):
        apply_overrides(get_preset("tiny"), base + ["train.rollout_temperature=2", "train.rollout_top_p=0.9"])
    apply_overrides(get_preset("tiny"), base + ["train.rollout_temperature=2.0", "train.rollout_top_p=1"])  # advice
    apply_overrides(get_preset("tiny"), base + ["loss.on_policy_estimator=full"])  # the other advice
    apply_overrides(get_preset("tiny"), ["train.on_policy=0", "loss.on_policy_estimator=sampled"])  # no rollouts


def test_on_policy_needs_a_teacher_that_scores_and_an_alpha_below_one():
    from pocket_teacher.config import ConfigError, apply_overrides, get_preset

    with pytest.raises(ConfigError, match=r"train\.on_policy=1\.0 is invalid: on-policy steps .* loss\.alpha < 1"):
        apply_overrides(get_preset("tiny"), ["train.on_policy=1", "loss.alpha=1"])
    with pytest.raises(ConfigError, match=r"train\.on_policy=1\.5 is invalid"):
        apply_overrides(get_preset("tiny"), ["train.on_policy=1.5"])


def test_an_on_policy_run_resumes_exactly(tmp_path):
    common = ON + ["train.max_steps=6", "train.on_policy=0.5", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
    whole = train(common, tmp_path / "a" / "checkpoints")
    folder = tmp_path / "b" / "checkpoints"
    train(common, folder)
    for path in list_checkpoints(folder)[:2]:  # newest first: keep only the checkpoint after step 2
        import shutil
        shutil.rmtree(path)
    resumed = train(common, folder, resume=True)
    assert "checkpoint-000002" in resumed.resumed_from
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert [h.get("rollout_tokens_mean") for h in resumed.history] == [h.get("rollout_tokens_mean")
                                                                      for h in whole.history]


@pytest.mark.slow
def test_an_on_policy_run_killed_mid_way_resumes_exactly(tmp_path):
    common = ON + ["train.max_steps=6", "train.on_policy=0.5", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
    whole = train(common, tmp_path / "whole" / "checkpoints")
    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, str(JOB), str(tmp_path / "h.json"), str(folder), *common],
                            env=dict(os.environ, STEP_DELAY="0.4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (folder / "checkpoint-000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "checkpoint-000006").exists()
    resumed = train(common, folder, resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_no_padded_vocabulary_id_is_ever_generated_or_sampled(tiny_cfg, tiny_tokenizer):
    """An output layer 64 rows wider than the tokenizer, with those rows made the likeliest by far: greedy decoding,
    sampled generation and on-policy rollouts still only produce ids the tokenizer has."""
    from pocket_teacher.batches import answer_batch
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.generate import generate, sample_rollouts
    from pocket_teacher.models import build_tiny_model

    size = len(tiny_tokenizer)
    model = build_tiny_model(tiny_cfg.teacher.tiny, size + 64).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[size:] = model.get_output_embeddings().weight[:size].abs().max() * 50
    split = tokenize_examples(load_gsm_symbolic(4, seed=3)[0], tiny_tokenizer, max_length=384)
    batch = answer_batch(split, range(4), tiny_tokenizer.pad_token_id)
    for top_p in (1.0, 0.9):
        rollouts = sample_rollouts(model, batch, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=0, seed=1,
                                   top_p=top_p, max_new_tokens=12, vocab_size=size)
        assert int(rollouts.batch.input_ids.max()) < size
    unguarded = sample_rollouts(model, batch, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=0, seed=1,
                                max_new_tokens=12)
    assert int(unguarded.batch.input_ids.max()) >= size  # the test's model would pick them without the guard
    for settings in (GenerateConfig(max_new_tokens=8), GenerateConfig(max_new_tokens=8, temperature=1.0)):
        seen = []
        real = model.generate

        def spy(*a, **k):
            out = real(*a, **k)
            seen.append(int(out.max()))
            return out
        model.generate = spy
        generate(model, tiny_tokenizer, ["Tom has 3 apples."], settings, progress=False)
        del model.generate
        assert seen and max(seen) < size


def test_the_preview_off_says_how_to_run_it_and_that_setting_runs_it(tmp_path, capsys):
    """With the preview off, the run says which setting turns it on; that setting, given, runs its steps."""
    from pocket_teacher.experiment import Experiment, configure

    common = [f"run.out_dir={tmp_path}", "train.max_steps=8", "eval.generate_samples=0", "eval.efficiency=false",
              "eval.baseline=false", "train.rollout_max_new_tokens=8"]
    for preview in (0, 8):
        exp = Experiment(configure("tiny", [*common, f"eval.on_policy_preview={preview}", f"run.name=p{preview}"]),
                         progress=False)
        for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache",
                       "distil", "on_policy_preview"):
            getattr(exp, method)()
        said = capsys.readouterr().out
        if preview == 0:
            assert exp.preview is None and "run it with eval.on_policy_preview=8" in said
        else:  # the advice, followed
            assert exp.preview["steps"] == 8 and "on-policy preview: 8 steps in" in said
