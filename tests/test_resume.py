"""A run stopped anywhere finishes: the tiny preset stopped by SIGTERM in the distillation, in the baseline, in the
on-policy preview, or after training, then continued exactly as the message says (`--resume`), ends with the
results, histories and student of an uninterrupted run (timings aside)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pocket_teacher import cli, experiment, train

TIMINGS = {"environment", "train_seconds", "train_s", "elapsed_s", "tokens_per_s", "build_seconds",
           "status", "path"}  # the teacher cache's: "built" in one run, "reused" by the resumed one, in its folder


def _strip(value):
    """`value` without wall-clock figures (seconds, tokens per second, latency, memory peaks) at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if k not in TIMINGS and not k.endswith("_s") and not k.startswith(("latency", "tokens_per_s", "peak"))}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _outputs(out, stages=(".", "baseline", "on_policy_preview")):
    histories = {name: [_strip(json.loads(line)) for line in (out / name / "history.jsonl").read_text().splitlines()]
                 for name in stages}
    return _strip(json.loads((out / "results.json").read_text())), histories, load_file(out / "student" /
                                                                                          "model.safetensors")


def _run(out, *extra):
    return cli.main(["run", "--preset", "tiny", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "t"
    assert _run(out) == 0
    return _outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("where,step", [(".", 3), ("baseline", 3), ("on_policy_preview", 1), ("evaluate_after", 0)])
def test_a_run_stopped_anywhere_resumes_to_the_uninterrupted_results(whole, tmp_path, monkeypatch, capsys, where,
                                                                      step):
    out, sent = tmp_path / "t", []
    real_stream, real_evaluate = train.Trainer.stream, experiment.Experiment.evaluate_after

    def stream(self, row):  # SIGTERM to this process right after `step` of the chosen training
        real_stream(self, row)
        if not sent and self.run_folder.resolve() == (out / where).resolve() and row["step"] == step:
            sent.append(where)
            os.kill(os.getpid(), signal.SIGTERM)

    def evaluate_after(self):
        if where == "evaluate_after" and not sent:
            sent.append(where)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, before the section runs
        return real_evaluate(self)
    monkeypatch.setattr(train.Trainer, "stream", stream)
    monkeypatch.setattr(experiment.Experiment, "evaluate_after", evaluate_after)
    assert _run(out) == 128 + signal.SIGTERM and sent
    message = capsys.readouterr().err
    assert "continue with --resume" in message and "TRAIN_OVERRIDES = ['train.resume=true']" in message
    assert not (out / "results.json").exists()
    monkeypatch.undo()
    assert _run(out, "--resume") == 0  # the message's advice, followed literally
    results, histories, student = _outputs(out)
    expected_results, expected_histories, expected_student = whole
    assert results == expected_results and histories == expected_histories
    assert student.keys() == expected_student.keys()
    assert all(torch.equal(student[k], expected_student[k]) for k in student)


@pytest.mark.slow
def test_the_notebook_way_to_resume_continues_the_distillation(tmp_path):
    """The notebook resumes with TRAIN_OVERRIDES = ['train.resume=true'] in the Distillation cell: the training
    continues from its checkpoint instead of starting again."""
    exp = experiment.Experiment(experiment.configure("tiny", [f"run.out_dir={tmp_path}", "train.checkpoint_every=2",
                                                              "eval.baseline=false"]), progress=False)
    for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
        getattr(exp, method)()
    first = exp.distil()
    again = exp.distil(["train.resume=true"])
    assert again.result.resumed_from.endswith("checkpoint-000008")
    assert again.result.history == first.result.history
    assert all(torch.equal(a, b) for a, b in zip(first.student.state_dict().values(),
                                                  again.student.state_dict().values()))


KILLED = {"tiny": (".", "baseline", "on_policy_preview"), "tiny-text": (".", "baseline")}
# each stage lasts a second or two, so that a kill lands inside it; the preview has no checkpoints of its own
SLOW_STEPS = {"tiny": ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=4", "--set",
                       "eval.on_policy_preview=16"],
              "tiny-text": ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=4"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    done = {}
    for preset in KILLED:
        out = tmp_path_factory.mktemp("uninterrupted") / preset
        assert cli.main(["run", "--preset", preset, "--out", str(out), "--no-progress", *SLOW_STEPS[preset]]) == 0
        done[preset] = _outputs(out, stages=KILLED[preset])
    return done


@pytest.mark.slow
@pytest.mark.parametrize("preset,where", [(p, w) for p, stages in KILLED.items() for w in stages])
def test_a_run_killed_hard_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, preset, where):
    """kill -9 (no handler runs, no checkpoint is written on the way out, the run folder's lock is left behind)
    in the middle of a training stage of a separate process; `--resume` then finishes with the uninterrupted
    results, histories and student."""
    out = tmp_path / preset
    command = [sys.executable, "-m", "pocket_teacher", "run", "--preset", preset, "--out", str(out), "--no-progress",
               *SLOW_STEPS[preset]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = 16 if where == "on_policy_preview" else 40  # the stage's own steps
    history, killed_at = out / where / "history.jsonl", None
    deadline = time.monotonic() + 300
    while killed_at is None and process.poll() is None and time.monotonic() < deadline:
        steps = [json.loads(line).get("step", 0) for line in
                 (history.read_text().splitlines() if history.is_file() else []) if line.endswith("}")]
        if steps and max(steps) >= 6:  # past the first checkpoint of this stage, before its end
            process.send_signal(signal.SIGKILL)
            killed_at = max(steps)
        time.sleep(0.01)
    process.wait(60)
    assert killed_at is not None and killed_at < last, f"{where} of {preset} ended before it could be killed"
    assert process.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    assert cli.main(["run", "--preset", preset, "--out", str(out), "--no-progress", *SLOW_STEPS[preset],
                     "--resume"]) == 0
    results, histories, student = _outputs(out, stages=KILLED[preset])
    expected_results, expected_histories, expected_student = uninterrupted[preset]
    assert results == expected_results and histories == expected_histories
    assert all(torch.equal(student[k], expected_student[k]) for k in expected_student)
