"""End to end on the tiny preset: the CLI, its errors, and the notebook executed headless."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocket_teacher.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _mmlu_file(path):
    subjects = ["astronomy", "virology"]
    rows = [{"question": f"Question {i}?", "subject": subjects[i % 2], "choices": ["w", "x", "y", "z"],
             "answer": i % 4} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_run_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "runs" / "t1"
    mmlu = _mmlu_file(tmp_path / "mmlu.jsonl")
    assert main(["run", "--preset", "tiny", "--set", "train.max_steps=4", "--set", f"eval.mmlu_source={mmlu}",
                 "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
                 "--out", str(out), "--no-progress"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "environment.json", "history.jsonl", "results.json", "results.md", "generations.jsonl",
            "mmlu.jsonl", "figures", "student", "baseline"} <= names
    assert {p.name for p in (out / "figures").iterdir()} == {"quality.png", "training.png", "size.png",
                                                             "latency.png", "mmlu.png"}
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["teacher", "student before", "student after", "fine-tuned (alpha=1)"]
    assert all(r["mmlu_questions"] == 10 and set(r["mmlu_per_subject"]) == {"astronomy", "virology"}
               for r in results)
    assert results[0].get("top1_agreement") is None and 0 <= results[2]["top1_agreement"] <= 1
    assert all(r["size_mb"] > 0 and r["latency_ms_per_token"] > 0 for r in results)
    assert len((out / "mmlu.jsonl").read_text().splitlines()) == 40
    assert "| fine-tuned (alpha=1) |" in (out / "results.md").read_text()
    assert len((out / "history.jsonl").read_text().splitlines()) == 4
    assert len((out / "baseline" / "history.jsonl").read_text().splitlines()) == 4
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "eval_ppl" in h] == [2, 4] and history[1]["eval_kd"] is not None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
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
    assert {p.name for p in figures.iterdir()} == {"quality.png", "training.png", "size.png", "latency.png"}
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4
