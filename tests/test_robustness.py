"""A run that never lies: divergence, resume identity, locks, signals, full disks, bad bytes and messages
(pocket_teacher.train, checkpoints, experiment, runfolder, teacher_cache, data, config, cli, losses)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocket_teacher.checkpoints import CheckpointError, list_checkpoints, trainer_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_job import train  # noqa: E402

JOB = Path(__file__).resolve().parent / "_train_job.py"
BASE = ["train.max_steps=6", "train.warmup_steps=1", "train.checkpoint_every=2", "train.batch_size=2"]


def _finite(path: Path) -> bool:
    state = torch.load(path / "model.pt")
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_a_huge_lr_never_leaves_non_finite_weights_and_says_how_to_recover(tmp_path):
    from pocket_teacher.train import TrainingDiverged

    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingDiverged) as info:
        train(BASE + ["train.lr=1.0e+30"], folder)
    assert "optimizer step was not taken" in str(info.value)
    # lr=1e30 wrecks the weights in the steps before the loss shows it: the message says so at once, saves no
    # "last good" checkpoint of them, and does not advise a resume that could not work
    assert re.search(r"finite but already damaged .*largest weight is [\d.e+]+, against [\d.]+ when this training "
                     r"started at step 0\).*Start again without --resume", str(info.value)), str(info.value)
    assert "--resume --set" not in str(info.value)
    saved = list_checkpoints(folder)
    assert all(_finite(p) for p in saved) and not any(trainer_state(p).get("diverged_after") for p in saved)
    if saved:  # a periodic checkpoint of damaged weights, resumed by hand, is caught at its first step
        with pytest.raises(TrainingDiverged, match="already damaged|first step after resuming"):
            train(BASE + ["train.lr=1e-3", "train.resume_allow=[train.lr]"], folder, resume=True)
    result = train(BASE + ["train.lr=1e-3"], folder)  # the advice: start again with a lower lr
    assert len(result.history) == 6 and all(math.isfinite(h["loss"]) for h in result.history)


def test_the_divergence_advice_continues_from_the_last_good_weights(tmp_path, tiny_teacher):
    """A teacher that returns NaN once (overflow, a bad batch) makes step 3 diverge: the weights after step 2 are
    saved untouched, and the command the message prints finishes the run."""
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.models import build_tiny_tokenizer, derive_student
    from pocket_teacher.train import TrainingDiverged, Vocab, distill

    tok = build_tiny_tokenizer(get_preset("tiny").teacher.tiny.vocab_size)
    split = tokenize_examples(load_gsm_symbolic(16, seed=3)[0], tok, max_length=384)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output.last_hidden_state.fill_(float("nan"))
    handle = tiny_teacher.model.register_forward_hook(poison)
    folder = tmp_path / "checkpoints"

    def run(*overrides, resume=False):
        cfg = apply_overrides(get_preset("tiny"), ["train.max_steps=6", "train.warmup_steps=1", "train.batch_size=2",
                                                   "teacher_cache.use=false", f"train.resume={str(resume).lower()}",
                                                   *overrides])
        torch.manual_seed(0)
        student = derive_student(tiny_teacher, num_layers=2)
        return distill(student, tiny_teacher, split, cfg, Vocab(tok.pad_token_id, len(tok)), folder=folder.parent,
                       progress=False)
    with pytest.raises(TrainingDiverged, match=r"step 3.*checkpoint-000002") as info:
        run()
    handle.remove()
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-000002"] and _finite(list_checkpoints(folder)[0])
    assert "--resume --set train.lr=0.0003 --set 'train.resume_allow=[train.lr]'" in str(info.value)
    result = run("train.lr=0.0003", "train.resume_allow=[train.lr]", resume=True)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(h["loss"]) for h in result.history)












def test_a_full_disk_gives_a_clear_message_and_no_leftovers(tmp_path, monkeypatch):
    import shutil

    from pocket_teacher import checkpoints

    folder = tmp_path / "checkpoints"
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match="Not enough free space for checkpoint-000002.*MiB needed"):
        train(BASE, folder)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", real)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"No space left on device \(1\.\d MiB needed, [\d,.]+ MiB free\)\. "
                                               r"The partial copy was removed; earlier checkpoints are intact"):
        train(BASE, tmp_path / "other" / "checkpoints")
    assert not list((tmp_path / "other" / "checkpoints").glob(".tmp-*"))


def test_cache_build_checks_free_space(tmp_path, monkeypatch, tiny_teacher, tiny_tokenizer):
    import shutil

    from pocket_teacher import teacher_cache
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples

    split = tokenize_examples(load_gsm_symbolic(4, seed=3)[0], tiny_tokenizer, max_length=384)
    real = shutil.disk_usage
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(teacher_cache.CacheError, match="Not enough free space for the teacher cache.*MiB needed"):
        teacher_cache.build_topk_cache(tiny_teacher, split, tmp_path, k=8, progress=False)


def test_a_flipped_byte_in_a_partial_cache_is_found_on_resume(tmp_path, monkeypatch, tiny_teacher, tiny_tokenizer):
    from pocket_teacher import teacher_cache
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples

    split = tokenize_examples(load_gsm_symbolic(8, seed=3)[0], tiny_tokenizer, max_length=384)
    clean = teacher_cache.build_topk_cache(tiny_teacher, split, tmp_path / "clean", k=8, batch_size=2,
                                           progress=False)
    expected = np.fromfile(Path(clean.path) / "ids.bin", dtype=np.int32)
    real_write = teacher_cache.write_json

    def die_after_two_batches(path, data):
        real_write(path, data)
        if data.get("rows_done", 0) >= 4:
            raise KeyboardInterrupt  # killed mid-build
    monkeypatch.setattr(teacher_cache, "write_json", die_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.build_topk_cache(tiny_teacher, split, tmp_path / "c", k=8, batch_size=2, progress=False)
    monkeypatch.setattr(teacher_cache, "write_json", real_write)
    partial = next((tmp_path / "c").glob("*.partial"))
    ids = partial / "ids.bin"
    data = bytearray(ids.read_bytes())
    data[5] ^= 0xFF  # a byte of the first, finished batch
    ids.write_bytes(bytes(data))
    cache = teacher_cache.build_topk_cache(tiny_teacher, split, tmp_path / "c", k=8, batch_size=2, progress=False)
    assert "damaged rows recomputed" in cache.report.status
    assert np.array_equal(np.fromfile(Path(cache.path) / "ids.bin", dtype=np.int32), expected)


def test_a_truncated_answers_file_is_named_and_rebuilt(tmp_path, capsys, tiny_teacher, tiny_tokenizer):
    from pocket_teacher.data import load_gsm_symbolic
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.generate import generate_answers

    examples = load_gsm_symbolic(3, seed=3)[0]
    _, first = generate_answers(tiny_teacher, tiny_tokenizer, examples, tmp_path, GenerateConfig(max_new_tokens=4),
                                progress=False)
    path = Path(first.path)
    path.write_text(path.read_text()[:-20])  # cut mid-line
    rows, again = generate_answers(tiny_teacher, tiny_tokenizer, examples, tmp_path, GenerateConfig(max_new_tokens=4),
                                   progress=False)
    assert again.status == "generated" and again.rows == len(examples)
    assert f"{path} is damaged" in capsys.readouterr().out


def test_a_second_run_into_a_busy_folder_refuses_and_names_the_holder(tmp_path):
    from pocket_teacher.runfolder import RunFolderBusy, lock_run_folder

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from pocket_teacher.runfolder import lock_run_folder
lock_run_folder(Path({str(out)!r}))
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid} on .*--out runs/NAME or --set "
                                             rf"run.name=NAME"):
        lock_run_folder(out)
    # the advice, followed while the holder still runs: another folder (--out), or another name (--set run.name)
    from pocket_teacher.experiment import configure
    from pocket_teacher.runfolder import run_dir

    lock_run_folder(tmp_path / "elsewhere")
    lock_run_folder(run_dir(configure("tiny", [f"run.out_dir={tmp_path}", "run.name=another"])))
    assert holder.poll() is None
    holder.send_signal(signal.SIGKILL)  # a killed holder leaves a stale lock, which is taken over
    holder.wait()
    lock_run_folder(out)
    assert json.loads((out / ".lock.json").read_text())["pid"] == os.getpid()


def test_a_dead_student_is_reported(tmp_path):
    from pocket_teacher.train import collapse_reason

    history = [{"grad_norm": 0.0, "loss": 7.0}] * 5
    assert "gradient norm was 0" in collapse_reason(history, 1000)
    assert "no better than guessing uniformly" in collapse_reason([{"grad_norm": 1.0, "eval_ppl": 990.0}], 1000)
    assert collapse_reason([{"grad_norm": 1.0, "eval_ppl": 12.0}] * 5, 1000) is None
    improving = [{"grad_norm": 1.0, "eval_ppl": 1000.0}, {"grad_norm": 1.0, "eval_ppl": 640.0}]
    assert collapse_reason(improving, 1024) is None  # a random tiny model learning: not a collapse
    result = train(["train.max_steps=10", "train.warmup_steps=1", "train.batch_size=2", "train.lr=1.0e+6",
                    "train.eval_every=10"], None)
    assert result.collapsed is not None


# -- data, config, messages, CLI, losses -----------------------------------------------------------------------------

def _jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


GOOD = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}


def test_a_bad_byte_is_named_by_file_and_line_and_can_be_skipped(tmp_path):
    from pocket_teacher.data import DataError, load_gsm8k

    path = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, b'{"question": "caf\xe9", "answer": "#### 1"}', GOOD])
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        load_gsm8k(path=str(path))
    rows, report = load_gsm8k(path=str(path), bad_rows="skip")
    assert len(rows) == 3 and report.skipped == {"not UTF-8": 1}


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_text(""), r"is empty \(no rows\)"),
    (lambda p: p.mkdir(), r"is a folder, not a JSONL file"),
    (lambda p: None, r"no such file.*relative paths start from|no such file"),
])
def test_empty_file_folder_and_missing_path_get_their_own_messages(tmp_path, make, match):
    from pocket_teacher.data import DataError, load_gsm8k

    path = tmp_path / "data.jsonl"
    make(path)
    with pytest.raises(DataError, match=match):
        load_gsm8k(path=str(path))


def test_duplicates_are_counted_and_dropped_on_request():
    from pocket_teacher.data import Example, LoadReport, handle_duplicates

    rows = [Example("q1", "t1", "1", "a:1"), Example("q1", "t1", "1", "a:2"), Example("q2", "t2", "2", "a:3")]
    report = LoadReport("x", rows=3, kept=3)
    assert len(handle_duplicates(rows, report, "keep")) == 3 and "1 duplicate row(s) kept" in str(report)
    report = LoadReport("x", rows=3, kept=3)
    assert [e.where for e in handle_duplicates(rows, report, "drop")] == ["a:1", "a:3"]
    assert report.skipped == {"duplicate": 1} and report.kept == 2


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.max_grad_norm=.nan", "loss.temperature=.inf",
                                      "loss.alpha=.nan"])
def test_nan_and_infinity_are_refused(override):
    from pocket_teacher.config import ConfigError, apply_overrides, get_preset

    with pytest.raises(ConfigError, match=r"finite number|is invalid"):
        apply_overrides(get_preset("tiny"), [override])


def test_topk_larger_than_the_vocabulary_is_refused_before_loading():
    from pocket_teacher.config import ConfigError, apply_overrides, get_preset

    with pytest.raises(ConfigError, match=r"teacher_cache\.k=5000 is invalid: the teacher's vocabulary has 1,024"):
        apply_overrides(get_preset("tiny"), ["teacher_cache.k=5000"])
    with pytest.raises(ConfigError, match=r"teacher_cache\.k=60000.*49,152"):
        apply_overrides(get_preset("pocket"), ["teacher_cache.k=60000"])


def test_a_missing_relative_model_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from pocket_teacher.config import StudentConfig
    from pocket_teacher.models import ModelLoadError
    from pocket_teacher.students import load_student

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"student\.source='models/student': no such folder.*local path"):
        load_student(StudentConfig(source="models/student"), None, None)


def test_vocabulary_advice_fits_the_settings(tiny_tokenizer, tiny_teacher):
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.models import VocabMismatchError, build_tiny_tokenizer
    from pocket_teacher.experiment import vocabulary

    other = build_tiny_tokenizer(512)
    cfg = apply_overrides(get_preset("tiny"), ["data.targets=teacher"])
    with pytest.raises(VocabMismatchError, match=r"data\.targets=teacher is already set.*set loss\.alpha=1") as info:
        vocabulary(cfg, tiny_tokenizer, other, tiny_teacher, None)
    assert "use data.targets=teacher" not in str(info.value)
    with pytest.raises(VocabMismatchError, match=r"data\.targets=teacher with loss\.alpha=1"):
        vocabulary(get_preset("tiny"), tiny_tokenizer, other, tiny_teacher, None)




@pytest.mark.parametrize("divergence", ["jsd", "skew_kl", "skew_reverse_kl", "forward_kl", "reverse_kl", "tvd"])
def test_every_divergence_has_finite_gradients_where_both_sides_are_minus_infinity(divergence):
    from pocket_teacher.losses import divergence_per_token

    log_p = torch.log_softmax(torch.tensor([[0.5, -math.inf, 1.0, -math.inf]]), -1)
    logits = torch.tensor([[0.1, -math.inf, 0.3, -math.inf]], requires_grad=True)
    out = divergence_per_token(log_p, torch.log_softmax(logits, -1), divergence).sum()
    out.backward()
    assert math.isfinite(float(out.detach())) and bool(torch.isfinite(logits.grad).all()), logits.grad




def test_results_json_says_when_the_student_collapsed(tmp_path, tiny_teacher, tiny_tokenizer):
    """The notebook and `run` both end in save_outputs: a student no better than uniform is reported there."""
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.runfolder import save_outputs
    from pocket_teacher.train import TrainResult

    cfg = apply_overrides(get_preset("tiny"), [f"run.out_dir={tmp_path}", "run.name=r"])
    rows = [{"model": "student after", "parameters": 1, "perplexity": 0.9 * len(tiny_tokenizer)}]
    out = save_outputs(cfg, tiny_teacher, tiny_tokenizer, rows, TrainResult(history=[{"grad_norm": 1.0}]))
    assert "no better than guessing uniformly" in json.loads((out / "results.json").read_text())["collapsed"]
    rows[0]["perplexity"] = 12.0
    out = save_outputs(cfg, tiny_teacher, tiny_tokenizer, rows, TrainResult(history=[{"grad_norm": 1.0}]))
    assert json.loads((out / "results.json").read_text())["collapsed"] is None


def test_a_collapse_is_reported_only_without_improvement_and_its_advice_fits_the_cause():
    from pocket_teacher.config import TrainConfig
    from pocket_teacher.train import uniform_collapse

    assert uniform_collapse(640.0, 1024, before=1100.0) is None  # stock tiny: worse than 512, better than before
    message = uniform_collapse(900.0, 1024, before=880.0, tcfg=TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3))
    assert "no better than before training (880) (lower train.lr (now 0.001))" in message
    message = uniform_collapse(900.0, 1024, before=880.0, tcfg=TrainConfig(max_steps=8, warmup_steps=8, lr=1e-3))
    assert "the warm-up (8 steps) takes the whole run (8 steps)" in message and "lower train.lr" not in message


def test_a_warm_up_longer_than_the_run_is_said(capsys):
    train(["train.max_steps=2", "train.warmup_steps=5", "train.batch_size=2"], None)
    assert "train.warmup_steps=5 is longer than train.max_steps=2: the learning rate ends at 40% of train.lr; " \
           "use train.warmup_steps <= 2." in capsys.readouterr().out
    train(["train.max_steps=2", "train.warmup_steps=2", "train.batch_size=2"], None)  # the advice, followed
    assert "WARNING" not in capsys.readouterr().out



def test_a_checkpoints_free_space_check_asks_for_what_it_writes(tmp_path, monkeypatch):
    """The figure the check compares is the one it names, and about the checkpoint's size (tied embeddings once):
    a checkpoint fits on a disk with its own size plus a little free."""
    import shutil

    from pocket_teacher import checkpoints

    whole = tmp_path / "whole" / "checkpoints"
    train(BASE[:1] + ["train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=2"], whole)
    size = sum(p.stat().st_size for p in (whole / "checkpoint-000002").iterdir())
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: real(p)._replace(free=int(size * 1.1)))
    train(BASE[:1] + ["train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=2"], tmp_path / "fits" /
          "checkpoints")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: real(p)._replace(free=int(size * 0.9)))
    with pytest.raises(CheckpointError) as info:
        train(BASE[:1] + ["train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=2"], tmp_path / "full" /
              "checkpoints")
    needed = float(re.search(r"([\d.]+) MiB needed", str(info.value)).group(1)) * 2**20
    assert size <= needed <= size * 1.1 + 2**17, (size, needed)


def test_write_text_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from pocket_teacher import files

    path = files.write_text(tmp_path / "results.json", "old")
    monkeypatch.setattr(files.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=r"Could not write .*results\.json: No space left on device \(0\.0 MiB needed"):
        files.write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_keeps_the_student_and_the_advice_works(tmp_path, monkeypatch, capsys):
    """The student's save fails as on a full disk: the error names the folder and the space, no results.json claims
    a finished run, no half-written student is left (an earlier one stays whole); --resume, as the message says,
    finishes without training again. Too little free space is refused before anything is written."""
    import shutil
    from safetensors.torch import load_file

    from pocket_teacher import cli, files, runfolder

    out = tmp_path / "t"
    args = ["run", "--preset", "tiny", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    before = load_file(out / "student" / "model.safetensors")
    (out / "results.json").unlink()
    real_save = runfolder.save_student

    def full(out_, student, tokenizer, after):
        def fails(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(student, "save_pretrained", fails)
        return real_save(out_, student, tokenizer, after)
    monkeypatch.setattr(runfolder, "save_student", full)
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    message = capsys.readouterr().err
    assert f"Could not write {out / 'student'}: No space left on device (" in message and "MiB free there)" in message
    assert "the same command with --resume" in message and "exp.save() again" in message
    assert not (out / "results.json").exists() and not list(out.glob(".student.*"))
    kept = load_file(out / "student" / "model.safetensors")
    assert all(torch.equal(kept[k], before[k]) for k in before)

    monkeypatch.setattr(runfolder, "save_student", real_save)
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    assert cli.main([*args, "--resume"]) == 2
    message = capsys.readouterr().err
    assert re.search(r"Not enough free space for the trained student and the results .* [\d.]+ MiB needed, 1\.0 MiB "
                     r"free", message)
    monkeypatch.setattr(files.shutil, "disk_usage", real)

    assert cli.main([*args, "--resume"]) == 0  # the advice, followed literally
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8 and "resume: continuing from" in capsys.readouterr().out


def test_save_student_clears_what_a_killed_save_left_and_puts_back_a_student_moved_aside(tmp_path, tiny_teacher,
                                                                                       tiny_tokenizer):
    """A save killed while writing leaves .student.tmp-PID (cleared by the next save); one killed between its two
    renames leaves the earlier student as .student.old-PID and no student/ (put back, then replaced)."""
    from pocket_teacher.runfolder import save_student

    first = save_student(tmp_path, tiny_teacher, tiny_tokenizer, "after")
    (tmp_path / ".student.tmp-99999").mkdir()
    (tmp_path / ".student.tmp-99999" / "model.safetensors").write_bytes(b"half")
    os.replace(first, tmp_path / ".student.old-99998")
    assert not first.exists()
    class Broken:
        def save_pretrained(self, path):
            Path(path).mkdir()
            raise RuntimeError("unexpected tensor layout")

    with pytest.raises(RuntimeError, match="^unexpected tensor layout$"):  # not a full disk: not reported as one
        save_student(tmp_path, Broken(), tiny_tokenizer, "after")
    assert (tmp_path / "student" / "model.safetensors").is_file()  # put back before the failed write
    save_student(tmp_path, tiny_teacher, tiny_tokenizer, "after")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
