"""pocket_teacher.cli: commands, exit codes, one-line errors."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocket_teacher.cli import main
from pocket_teacher.config import PRESETS, Config, get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,message", [
    (["run", "--preset", "nope"], "Unknown preset 'nope'"),
    (["run", "--preset", "tiny", "--set", "train.lr=-1"], "train.lr=-1.0 is invalid"),
    (["config", "--preset", "tiny", "--set", "trian.lr=1"], "Did you mean train?"),
])
def test_cli_errors_are_clear(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_presets_lists_every_preset_with_its_description():
    out = subprocess.run([sys.executable, "-m", "pocket_teacher", "presets"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert listed == {name: PRESETS[name].__doc__.strip() for name in PRESETS}


def test_config_prints_yaml_that_reads_back_with_the_overrides(capsys):
    assert main(["config", "--preset", "tiny", "--set", "loss.alpha=0.25", "--out", "runs/x"]) == 0
    cfg = Config.from_yaml(capsys.readouterr().out)
    assert cfg.loss.alpha == 0.25 and (cfg.run.out_dir, cfg.run.name) == ("runs", "x")
    assert cfg.train == get_preset("tiny").train


def test_resume_flag_is_the_config_setting(monkeypatch):
    import pocket_teacher.experiment as experiment

    seen = {}
    monkeypatch.setattr(experiment, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    assert main(["run", "--preset", "tiny", "--resume", "--no-progress"]) == 0
    assert seen["cfg"].train.resume is True


def test_user_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    from pocket_teacher.cli import main

    missing = tmp_path / "nope.jsonl"
    args = ["run", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "data.source=gsm8k",
            "--set", f"data.train_path={missing}", "--set", f"data.eval_path={missing}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "nope.jsonl" in err
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", *args])


def test_the_cli_maps_a_stop_signal_to_its_exit_code(monkeypatch, capsys):
    import pocket_teacher.experiment as experiment
    from pocket_teacher.cli import main
    from pocket_teacher.train import TrainingInterrupted

    def stopped(*a, **k):
        raise TrainingInterrupted(signal.SIGTERM, "SIGTERM after step 3 of 8; checkpoint saved in x")
    monkeypatch.setattr(experiment, "run", stopped)
    assert main(["run", "--preset", "tiny"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "stopped: SIGTERM after step 3 of 8; checkpoint saved in x"


@pytest.mark.parametrize("override,match,fix", [
    ("train.mixed_precision=fp16", "fp16 needs a CUDA GPU", "Use train.mixed_precision=auto"),
    ("teacher.precision=8bit", "8bit needs a CUDA GPU", "Use teacher.precision=fp32"),
    ("train.device=cuda", "no CUDA GPU is visible", "Use train.device=auto")])
def test_gpu_only_settings_on_cpu_fail_before_anything_loads(monkeypatch, tmp_path, capsys, override, match, fix):
    import pocket_teacher.experiment as experiment
    from pocket_teacher.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")

    def boom(*a, **k):
        raise AssertionError("nothing may load")
    monkeypatch.setattr(experiment, "load_data", boom)
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err and fix in err
    with pytest.raises(AssertionError, match="nothing may load"):  # the advice, followed: the checks pass
        main(["run", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", fix.removeprefix("Use ")])


def test_the_busy_folder_advice_run_name_is_followed_by_the_cli():
    from pocket_teacher.cli import _overrides, _parser

    args = _parser().parse_args(["run", "--preset", "tiny", "--set", "run.name=other"])
    assert _overrides(args)[-1] == "run.name=other"  # not replaced by the preset's name
    args = _parser().parse_args(["run", "--preset", "tiny"])
    assert _overrides(args)[-1] == "run.name=tiny"


def test_one_line_errors_for_the_users_input_a_traceback_for_a_library_failure():
    import torch

    from pocket_teacher.cli import is_user_error
    from pocket_teacher.generate import generate

    try:
        generate(None, None, [""])  # our own check: names the fix
    except ValueError as exc:
        assert is_user_error(exc)
    try:
        torch.zeros(2).view(3)  # raised inside torch: a programming error, keeps its traceback
    except RuntimeError as exc:
        assert not is_user_error(exc)
    try:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    except ValueError as exc:
        assert not is_user_error(exc)
    try:
        open("/no/such/file/anywhere")
    except OSError as exc:  # raised at a line of this test file, not of the package
        assert not is_user_error(exc)
