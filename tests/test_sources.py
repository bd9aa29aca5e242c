"""Every data source finishes a `tiny` run, every section included (slow tier: a run each, seconds apiece)."""

from __future__ import annotations

import json
import re

import pytest

from pocket_teacher.cli import main

WORDS = "the cat sat on a mat while dogs ran over green hills and rivers flowed past old stone bridges".split()


def _gsm8k(path, n):
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mmlu(path, n):
    subjects = ("astronomy", "virology", "marketing")
    rows = [{"question": f"Which number is {i} plus one?", "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)],
             "answer": 1, "subject": subjects[i % 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _texts(n):
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 9)) for i in range(n)]


def _sources(tmp):
    _gsm8k(tmp / "gsm_train.jsonl", 48), _gsm8k(tmp / "gsm_eval.jsonl", 8)
    _mmlu(tmp / "mmlu_train.jsonl", 48), _mmlu(tmp / "mmlu_eval.jsonl", 8)
    (tmp / "texts.txt").write_text("\n\n".join(_texts(60)) + "\n")
    (tmp / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(60)))
    small = ["data.train_size=40", "data.eval_size=8"]
    return {
        "gsm_symbolic": ["--preset", "tiny"],
        "gsm8k": ["--preset", "tiny", "--set", "data.source=gsm8k", "--set", f"data.train_path={tmp}/gsm_train.jsonl",
                  "--set", f"data.eval_path={tmp}/gsm_eval.jsonl", *sum((["--set", s] for s in small), [])],
        "mmlu": ["--preset", "tiny", "--set", "data.source=mmlu", "--set", f"data.train_path={tmp}/mmlu_train.jsonl",
                 "--set", f"data.eval_path={tmp}/mmlu_eval.jsonl", *sum((["--set", s] for s in small), [])],
        "text_txt": ["--preset", "tiny", "--set", "data.source=text", "--set", f"data.train_path={tmp}/texts.txt"],
        "text_jsonl": ["--preset", "tiny", "--set", "data.source=text", "--set", f"data.train_path={tmp}/texts.jsonl"],
        "teacher_text": ["--preset", "tiny-text"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("source", ["gsm_symbolic", "gsm8k", "mmlu", "text_txt", "text_jsonl", "teacher_text"])
def test_every_data_source_runs_every_section(tmp_path, source):
    args = _sources(tmp_path)[source]
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in results["results"]} >= {"teacher", "student before", "student after"}
    timings = json.loads((out / "timings.json").read_text())
    assert "9. Side by side" in timings["sections_s"]
    assert timings["plan"]["lengths"] == "tokenized" and timings["compared"][-1]["section"] == "total"
    assert set(timings["planned_s"]) <= set(timings["sections_s"])  # the plan's sections are the run's
    rows = [json.loads(line) for line in (out / "side_by_side.jsonl").read_text().splitlines()]
    assert rows and all(r["question"] for r in rows)  # every side-by-side row had a prompt to continue


@pytest.mark.slow
def test_resume_refuses_a_data_file_edited_under_the_same_path(tmp_path, capsys):
    """The resume check covers what training reads: one answer edited in the training file (same path, same
    settings) is refused with the difference named; the message's advice, followed literally, continues."""
    args = _sources(tmp_path)["gsm8k"]
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--no-progress"]) == 0
    path = tmp_path / "gsm_train.jsonl"
    rows = path.read_text().splitlines()
    row = json.loads(rows[20])  # rows 0-7 repeat the held-out questions and are skipped
    row["answer"] = row["answer"].replace("apples.\n", "apples in all.\n")
    path.write_text("\n".join([*rows[:20], json.dumps(row), *rows[21:]]) + "\n")
    capsys.readouterr()
    assert main(["run", *args, "--out", str(out), "--no-progress", "--resume"]) == 2
    message = capsys.readouterr().err
    assert "data.contents (the training rows' tokens" in message and "checkpoint '" in message
    allow = re.search(r"--set '(train\.resume_allow=\[[^]]*\])'", message).group(1)
    assert allow == "train.resume_allow=[data.contents, teacher.signal]"  # the cache of the edited rows is another
    assert main(["run", *args, "--out", str(out), "--no-progress", "--resume", "--set", allow]) == 0
