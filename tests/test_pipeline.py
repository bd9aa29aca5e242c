"""End to end on the tiny preset: the CLI, its errors, and the notebook executed headless."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocket_teacher.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_run_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "runs" / "t1"
    assert main(["run", "--preset", "tiny", "--set", "train.max_steps=4", "--out", str(out), "--no-progress"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "environment.json", "history.jsonl", "results.json", "generations.jsonl", "figures",
            "student"} <= names
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["teacher", "student before", "student after"]
    assert len((out / "history.jsonl").read_text().splitlines()) == 4
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
    assert "max_steps: 4" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args,message", [
    (["run", "--preset", "nope"], "Unknown preset 'nope'"),
    (["run", "--preset", "tiny", "--set", "train.lr=-1"], "train.lr=-1.0 is invalid"),
    (["config", "--preset", "tiny", "--set", "trian.lr=1"], "Did you mean train?"),
])
def test_cli_errors_are_clear(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pocket_teacher", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and all(c in out.stdout for c in ("run", "notebook", "presets", "config"))


def test_notebook_runs_on_tiny_preset(tmp_path):
    pytest.importorskip("nbclient")
    out = tmp_path / "nb"
    figures = tmp_path / "figs"
    code = main(["notebook", "--preset", "tiny", "--out", str(out), "--figures", str(figures)])
    assert code == 0
    import nbformat

    nb = nbformat.read(out / "Pocket_Teacher.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "student after" in json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "saved to" in text
    assert {p.name for p in figures.iterdir()} == {"quality.png", "training.png"}
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
