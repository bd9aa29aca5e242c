"""pocket_teacher.checkpoints and resume in pocket_teacher.train: resume after SIGKILL or SIGTERM, torn checkpoints,
settings that must match on resume, earlier runs moved aside, the non-finite-loss guard, evaluation during
training, and two gloo processes equal to one. Tests that start processes are marked slow."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocket_teacher.checkpoints import CheckpointError, checkpoint_problem, list_checkpoints, trainer_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_job import train  # noqa: E402

JOB = Path(__file__).resolve().parent / "_train_job.py"
COMMON = ["train.max_steps=8", "train.warmup_steps=2", "train.checkpoint_every=2", "train.keep_checkpoints=3",
          "train.batch_size=2", "train.eval_every=4"]


def _losses(history):
    return [round(h["loss"], 5) for h in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole") / "checkpoints"
    return train(COMMON, folder), folder


def test_checkpoints_are_written_pruned_and_evaluation_runs(uninterrupted):
    result, folder = uninterrupted
    names = [p.name for p in list_checkpoints(folder)]
    assert names == ["checkpoint-000008", "checkpoint-000006", "checkpoint-000004"]  # keep_checkpoints=3
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(folder))
    assert [h["step"] for h in result.history if "eval_ppl" in h] == [4, 8]
    assert all(h["eval_ppl"] > 1 and h["eval_kd"] >= 0 for h in result.history if "eval_ppl" in h)
    assert len(result.checkpoint_seconds) == 4


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    folder = tmp_path / "checkpoints"
    env = dict(os.environ, STEP_DELAY="0.4")
    proc = subprocess.Popen([sys.executable, str(JOB), str(tmp_path / "h.json"), str(folder), *COMMON], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (folder / "checkpoint-000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "checkpoint-000008").exists()  # killed mid-way
    resumed = train(COMMON, folder, resume=True)
    assert resumed.resumed_from is not None and "checkpoint-00000" in resumed.resumed_from
    assert len(resumed.history) == 8
    assert _losses(resumed.history) == _losses(whole.history)
    assert resumed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-6)


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    whole, source = uninterrupted
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("checkpoint-000004", "checkpoint-000006"):
        subprocess.run(["cp", "-r", str(source / name), str(folder / name)], check=True)
    torn = folder / "checkpoint-000006" / "model.pt"
    torn.write_bytes(torn.read_bytes()[:100])  # a torn write
    assert "model.pt" in checkpoint_problem(folder / "checkpoint-000006")
    resumed = train(COMMON, folder, resume=True)
    assert resumed.resumed_from.endswith("checkpoint-000004")
    assert _losses(resumed.history) == _losses(whole.history)


def test_non_finite_loss_stops_with_the_step_and_a_checkpoint(monkeypatch, tmp_path):
    import pocket_teacher.train as tr
    from pocket_teacher.train import TrainingDiverged

    real, calls = tr.chunked_distillation_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(total=out.total * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(tr, "chunked_distillation_loss", poisoned)
    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingDiverged, match=r"step 3 .*train.lr=.*checkpoint-000002"):
        train(["train.max_steps=6", "train.batch_size=2"], folder)
    assert checkpoint_problem(folder / "checkpoint-000002") is None


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    """Global batch 4: one process with batch 4, or two with 2 each (gloo on CPU): the same curve."""
    overrides = ["train.max_steps=4", "train.warmup_steps=1", "train.max_grad_norm=1.0"]
    single = train(overrides + ["train.batch_size=4"])
    out = tmp_path / "two.json"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(JOB), str(out), "-", *overrides, "train.batch_size=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads(out.read_text())
    assert [h["answer_tokens"] for h in two] == [h["answer_tokens"] for h in single.history]
    for a, b in zip(two, single.history):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "run" / "checkpoints"
    train(["train.max_steps=2", "train.log_with=tensorboard"], folder)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


BASE = ["train.max_steps=6", "train.warmup_steps=1", "train.checkpoint_every=2", "train.batch_size=2"]


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    folder = tmp_path / "checkpoints"
    train(BASE + ["train.lr=3e-3"], folder)
    with pytest.raises(CheckpointError, match=r"train\.lr: checkpoint 0\.003, now 0\.0001.*resume_allow"):
        train(BASE + ["train.lr=1e-4"], folder, resume=True)


def test_resume_with_an_allowed_change_uses_the_new_lr(tmp_path):
    from pocket_teacher.train import lr_factor

    folder = tmp_path / "checkpoints"
    train(BASE + ["train.max_steps=4", "train.lr=3e-3"], folder)
    result = train(BASE + ["train.lr=1e-4", "train.resume_allow=[train.lr, train.max_steps]"], folder, resume=True)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[4]["lr"] == pytest.approx(1e-4 * lr_factor(4, 1, 6, 0.1))


def test_a_new_run_moves_an_earlier_runs_checkpoints_aside_and_keeps_its_own(tmp_path):
    folder = tmp_path / "checkpoints"
    first = train(BASE + ["train.max_steps=8", "train.keep_checkpoints=2"], folder)
    second = train(BASE + ["train.max_steps=4", "train.keep_checkpoints=2", "train.lr=1e-3"], folder)
    own = list_checkpoints(folder)
    assert [p.name for p in own] == ["checkpoint-000004", "checkpoint-000002"]  # its own, not pruned
    assert {trainer_state(p)["run_id"] for p in own} == {second.run_id} != {first.run_id}
    aside = list_checkpoints(tmp_path / "checkpoints.previous-1")
    assert aside and {trainer_state(p)["run_id"] for p in aside} == {first.run_id}


def test_resume_without_a_checkpoint_refuses_and_keeps_the_history(tmp_path):
    with pytest.raises(CheckpointError, match="no valid checkpoint.*Run without --resume"):
        train(BASE, tmp_path / "checkpoints", resume=True)
    result = train(BASE, tmp_path / "checkpoints", resume=False)  # the advice, followed: it starts from step 0
    assert [h["step"] for h in result.history] == list(range(1, 7))


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_continues(tmp_path):
    folder = tmp_path / "checkpoints"
    common = BASE + ["train.checkpoint_every=0", "train.max_steps=8"]
    marker = tmp_path / "progress"
    env = dict(os.environ, STEP_DELAY="0.5", PROGRESS_FILE=str(marker))
    proc = subprocess.Popen([sys.executable, str(JOB), str(tmp_path / "h.json"), str(folder), *common], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM after step" in err and "--resume" in err
    saved = list_checkpoints(folder)
    assert len(saved) == 1
    stopped_at = trainer_state(saved[0])["step"]
    assert 1 <= stopped_at < 8
    resumed = train(common, folder, resume=True)
    assert len(resumed.history) == 8 and resumed.history[stopped_at - 1]["step"] == stopped_at


def _fit(split, overrides, folder, teacher, tok):
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.models import derive_student
    from pocket_teacher.train import Trainer, Vocab

    cfg = apply_overrides(get_preset("tiny"), BASE + overrides)
    torch.manual_seed(0)
    return Trainer(derive_student(teacher, num_layers=2), teacher, split, cfg, Vocab(tok.pad_token_id, len(tok)),
                   folder=folder, progress=False).fit()


def test_resume_compares_what_training_reads_not_a_list_of_settings(tmp_path):
    """An edited training row under the same settings is refused, named as data.contents; a setting upstream of
    training that leaves the rows and the teacher as they were (generate.batch_size, data.max_length above every
    row) is no reason to refuse; another teacher is refused as teacher.signal; resume_allow lets either through."""
    import dataclasses

    from pocket_teacher.config import get_preset
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.models import load_teacher

    teacher, tok, _ = load_teacher(get_preset("tiny").teacher, "cpu")
    examples = load_gsm_symbolic(8, seed=3)[0]
    split = tokenize_examples(examples, tok, max_length=384)
    _fit(split, [], tmp_path, teacher, tok)
    same = _fit(split, ["train.resume=true", "generate.batch_size=3", "data.max_length=999"], tmp_path, teacher, tok)
    assert same.resumed_from.endswith("checkpoint-000006")
    edited = [dataclasses.replace(examples[0], target=examples[0].target + " Checked twice."), *examples[1:]]
    with pytest.raises(CheckpointError, match=r"data\.contents \(the training rows' tokens.*resume_allow=\[data\."
                                              r"contents\]"):
        _fit(tokenize_examples(edited, tok, max_length=384), ["train.resume=true"], tmp_path, teacher, tok)
    other = load_teacher(get_preset("tiny").teacher, "cpu")[0]
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(CheckpointError, match=r"teacher\.signal \(the teacher's signal.*checkpoint 'live "):
        _fit(split, ["train.resume=true"], tmp_path, other, tok)
    allowed = _fit(tokenize_examples(edited, tok, max_length=384),
                   ["train.resume=true", "train.resume_allow=[data.contents]"], tmp_path, teacher, tok)
    assert allowed.resumed_from.endswith("checkpoint-000006")


def test_only_bookkeeping_settings_are_left_out_of_the_fingerprint():
    """The settings resume may change are marked at their definition (knob(bookkeeping=True)), each a train.*
    setting of where or how training runs or what it records; every student, loss and other train setting is in."""
    import dataclasses

    from pocket_teacher.config import get_preset
    from pocket_teacher.train import training_fingerprint

    cfg = get_preset("tiny")
    free = {f.name for f in dataclasses.fields(cfg.train) if f.metadata.get("bookkeeping")}
    assert free == {"device", "gradient_checkpointing", "checkpoint_every", "save_final", "keep_checkpoints", "resume",
                    "resume_allow", "eval_every", "log_with"}
    keys = training_fingerprint(cfg, contents={"data.contents": "x", "teacher.signal": "y"})
    assert {k for k in keys if k.startswith("train.")} == {f"train.{f.name}" for f in dataclasses.fields(cfg.train)
                                                           if f.name not in free}
    assert {"loss.temperature", "loss.alpha", "train.seed", "data.contents", "teacher.signal"} <= set(keys)
    assert not any(k.startswith(("data.source", "generate.", "teacher_cache.", "eval.", "run.")) for k in keys)
