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

TIMINGS = {"environment", "train_seconds", "train_s", "elapsed_s", "tokens_per_s", "build_seconds"}


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
    results = _strip(json.loads((out / "results.json").read_text()))
    for key in ("status", "path"):  # the teacher cache: "built" in one run, "reused" by the resumed one; its folder
        (results.get("teacher_cache") or {}).pop(key, None)
    # the data lines name the run's cache folder (beside the run folder, so each test has its own)
    results["data"] = [line.replace(str(out.parent), "<runs>") for line in results.get("data", [])]
    return results, histories, load_file(out / "student" / "model.safetensors")


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


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it (papermill's kernel runs in its own session)."""
    import psutil

    parent = psutil.Process(process.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _notebook(out, *extra):
    return [sys.executable, "-m", "pocket_teacher", "notebook", "--preset", "tiny", "--out", str(out),
            *SLOW_STEPS["tiny"], *extra]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["baseline"])  # the distillation too: `-k notebook_killed` with "." added here
def test_the_notebook_killed_hard_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, where):
    """The notebook path (papermill and its kernel) killed with SIGKILL inside the baseline (the distillation has
    finished and resumes past its end, the baseline from its checkpoint); executed again with --resume (the
    notebook's OVERRIDES get train.resume=true) it ends with the uninterrupted notebook run's results, histories
    and student, which are those of the uninterrupted `run` (the notebook and `run` write the same results:
    test_experiment). One kill point keeps CI's time: each notebook run starts a kernel."""
    out = tmp_path / "tiny"
    process = subprocess.Popen(_notebook(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history, killed_at = out / where / "history.jsonl", None
    deadline = time.monotonic() + 600
    while killed_at is None and process.poll() is None and time.monotonic() < deadline:
        steps = [json.loads(line).get("step", 0) for line in
                 (history.read_text().splitlines() if history.is_file() else []) if line.endswith("}")]
        if steps and max(steps) >= 6:
            _kill_tree(process)
            killed_at = max(steps)
        time.sleep(0.01)
    process.wait(60)
    assert killed_at is not None and killed_at < 40, f"the {where} stage ended before it could be killed"
    assert process.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    subprocess.run(_notebook(out, "--resume"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=900)
    results, histories, student = _outputs(out, stages=KILLED["tiny"])
    expected_results, expected_histories, expected_student = uninterrupted["tiny"]
    assert results == expected_results and histories == expected_histories
    assert all(torch.equal(student[k], expected_student[k]) for k in expected_student)


# The embedded pocket preset (SmolLM2 teacher from its GGUF, the 10-layer student, the top-64 cache), made small
# enough to run three times: every stage still runs, on the real shapes (a 49,152-token vocabulary).
POCKET_SMALL = ["--set", "data.train_size=32", "--set", "data.eval_size=8", "--set", "eval.generate_samples=2",
                "--set", "eval.max_new_tokens=16", "--set", "eval.side_by_side=1", "--set", "train.max_steps=12",
                "--set", "train.warmup_steps=2", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=6",
                "--set", "eval.on_policy_preview=6", "--set", "train.rollout_max_new_tokens=24"]
POCKET_STAGES = (".", "baseline", "on_policy_preview")


def _pocket(out, *extra):
    return [sys.executable, "-m", "pocket_teacher", "run", "--preset", "pocket", "--out", str(out), "--no-progress",
            *POCKET_SMALL, *extra]


def _kill_inside(command, history, after_step, how=signal.SIGKILL, log=None, timeout=1800):
    """Start `command`; once `history` shows a step past `after_step`, stop it: SIGKILL to it and its children, or
    SIGTERM to the run alone (its handler checkpoints and exits). The step and the exit code."""
    with open(log or os.devnull, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        killed_at, deadline = None, time.monotonic() + timeout
        while killed_at is None and process.poll() is None and time.monotonic() < deadline:
            steps = [json.loads(line).get("step", 0) for line in
                     (history.read_text().splitlines() if history.is_file() else []) if line.endswith("}")]
            if steps and max(steps) > after_step:
                _kill_tree(process) if how == signal.SIGKILL else process.send_signal(how)
                killed_at = max(steps)
            time.sleep(0.01)
        process.wait(300)
    return killed_at, process.returncode


@pytest.mark.pocket
def test_the_pocket_preset_stopped_in_every_training_stage_resumes_to_the_uninterrupted_results(tmp_path):
    """One pocket run stopped three times, inside the distillation (SIGTERM), the baseline (SIGKILL) and the
    on-policy preview (SIGTERM), each time resumed as the stop's message advises (`--resume`) until the next stop,
    then finished with --resume: its results, histories and student equal an uninterrupted run's.
    `make test-pocket`; minutes on 2 cores."""
    whole = tmp_path / "whole"
    subprocess.run(_pocket(whole), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
    out = tmp_path / "killed"
    stops = ((".", 3, signal.SIGTERM), ("baseline", 5, signal.SIGKILL), ("on_policy_preview", 1, signal.SIGTERM))
    for stage, after, how in stops:
        resume = [] if stage == "." else ["--resume"]
        log = tmp_path / f"stderr-{stage.strip('.') or 'distil'}.txt"
        killed_at, rc = _kill_inside(_pocket(out, *resume), out / stage / "history.jsonl", after, how, log)
        last = 6 if stage == "on_policy_preview" else 12
        expected_rc = -signal.SIGKILL if how == signal.SIGKILL else 128 + how
        assert killed_at is not None and killed_at < last and rc == expected_rc, (stage, killed_at, rc)
        assert not (out / "results.json").exists()
        if how == signal.SIGTERM:  # the message's advice, which the next command follows
            assert "--resume" in log.read_text(), log.read_text()[-2000:]
    subprocess.run(_pocket(out, "--resume"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=3600)
    results, histories, student = _outputs(out, stages=POCKET_STAGES)
    expected_results, expected_histories, expected_student = _outputs(whole, stages=POCKET_STAGES)
    assert results == expected_results and histories == expected_histories
    assert all(torch.equal(student[k], expected_student[k]) for k in expected_student)
