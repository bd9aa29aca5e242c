"""End to end on the tiny preset: the CLI, its errors, and the notebook executed headless."""

import json
from pathlib import Path

import pytest
import torch

from pocket_teacher.cli import main
from pocket_teacher.config import Config, get_preset
from pocket_teacher.experiment import configure, preview_config

ROOT = Path(__file__).resolve().parents[1]


def _mmlu_file(path):
    subjects = ["astronomy", "virology"]
    rows = [{"question": f"Question {i}?", "subject": subjects[i % 2], "choices": ["w", "x", "y", "z"],
             "answer": i % 4} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
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


TIMING_KEYS = ("train_seconds", "generation_s", "mmlu_s", "latency_ms_per_token", "tokens_per_s_b1",
               "tokens_per_s_b16", "peak_memory_mb_b16")


def _without_timings(path):
    """results.json without wall times and speeds (top level, per model, and in nested reports such as the
    on-policy preview): everything else must match."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in TIMING_KEYS and not k.endswith("_s")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    data = json.loads(path.read_text())
    if data.get("teacher_cache"):  # the second run reuses the cache the first built: its status and time differ
        data["teacher_cache"] = {k: v for k, v in data["teacher_cache"].items()
                                 if k not in ("status", "build_seconds")}
    return strip(data)


def _check_the_executed_notebook(out, figures):
    """Every cell of the executed notebook ran without an error, the plots and the committed figure show, and
    section 11 shipped the student as a GGUF file."""
    import nbformat

    nb = nbformat.read(out / "Pocket_Teacher.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "student after" in json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "saved to" in text
    assert {p.name for p in figures.iterdir()} == {"quality.png", "training.png", "size.png", "latency.png"}
    plots = next(c for c in nb.cells if c.cell_type == "code" and "exp.plots()" in c.source)
    assert sum("image/png" in o.get("data", {}) for o in plots.outputs) == 4  # quality, training, size, latency
    kd_cell = next(c for c in nb.cells if c.cell_type == "code" and "kd_vs_sft.png" in c.source)
    assert any("image/png" in o.get("data", {}) for o in kd_cell.outputs)  # the committed benchmark figure
    assert f"GGUF q8_0: {out / 'student-q8_0.gguf'}" in text  # 11. Ship it
    assert (out / "student-q8_0.gguf").stat().st_size > 0


@pytest.mark.slow
def test_the_notebook_and_run_write_the_same_results(tmp_path):
    """One path: the notebook's cells and `run` call the same Experiment methods, so on the tiny preset they
    write the same results.json, history and side-by-side answers (timings aside). The notebook runs once in this
    tier, so its own outputs are checked here too: no cell fails, the plots show, the GGUF ships."""
    pytest.importorskip("papermill")
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert main(["notebook", "--preset", "tiny", "--out", str(tmp_path / "nb"), "--figures",
                 str(tmp_path / "figs")]) == 0
    cli, nb = tmp_path / "cli", tmp_path / "nb"
    _check_the_executed_notebook(nb, tmp_path / "figs")
    assert _without_timings(cli / "results.json") == _without_timings(nb / "results.json")
    for name in ("history.jsonl", "baseline/history.jsonl"):
        rows = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                 for line in (folder / name).read_text().splitlines()] for folder in (cli, nb)]
        assert rows[0] == rows[1] and len(rows[0]) == 8
    assert (cli / "side_by_side.jsonl").read_text() == (nb / "side_by_side.jsonl").read_text()
    configs = [Config.from_yaml(folder / "config.yaml") for folder in (cli, nb)]
    assert configs[0].run.name == "cli" and configs[1].run.name == "nb"
    assert [c.to_dict() | {"run": None} for c in configs][0] == [c.to_dict() | {"run": None} for c in configs][1]


@pytest.fixture()
def experiment(tmp_path):
    from pocket_teacher.experiment import Experiment, configure

    cfg = configure("tiny", [f"run.out_dir={tmp_path}", "run.name=exp", "train.max_steps=2", "eval.efficiency=false",
                             "eval.generate_samples=0", "eval.side_by_side=1"])
    exp = Experiment(cfg, progress=False)
    for step in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
        getattr(exp, step)()
    return exp


def test_the_training_cell_never_rebinds_the_config(experiment):
    exp = experiment
    trained = exp.distil(["loss.alpha=0.2", "train.max_steps=3"])
    assert (exp.cfg.loss.alpha, exp.cfg.train.max_steps) == (0.5, 2)
    assert (trained.cfg.loss.alpha, trained.cfg.train.max_steps) == (0.2, 3) and len(trained.result.history) == 3
    baseline = exp.train_baseline()  # follows the training it is compared with: same steps
    assert len(baseline.result.history) == 3 and baseline.cfg.loss.alpha == 0.2
    again = exp.distil()  # an empty list undoes the overrides
    assert again.cfg == exp.cfg and len(again.result.history) == 2
    exp.evaluate_before()
    exp.evaluate_after()
    out = exp.save()
    saved = json.loads((out / "results.json").read_text())
    assert saved["train_overrides"] == [] and saved["steps"] == 2
    assert "alpha: 0.5" in (out / "config.yaml").read_text()


def test_the_trained_student_and_the_baseline_ship_as_gguf_files(experiment):
    """Experiment.export: the student in memory, read back from the file, is the student after the same
    quantization (the same path as `python -m pocket_teacher export`)."""
    from pocket_teacher.export import fake_quantize, load_gguf

    exp = experiment
    with pytest.raises(RuntimeError, match="distil"):
        exp.export()
    trained = exp.distil()
    report = exp.export("q8_0", equalize=False)
    assert report.path == exp.out / "student-q8_0.gguf" and report.path.is_file() and not report.equalized
    back, _ = load_gguf(report.path)
    ids = torch.tensor([exp.splits.eval[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, fake_quantize(trained.student, "q8_0")(ids).logits)
    rows = exp.calibration_rows()  # by default the activations are equalized, scales from the training rows
    assert rows == [list(exp.splits.train[i]["input_ids"]) for i in range(min(32, len(exp.splits.train)))]
    report = exp.export("q8_0", out=exp.out / "equalized.gguf")
    assert report.equalized.startswith(f"activations equalized (alpha 0.5, scales from {len(rows)} training rows")
    assert not exp.export("f32", out=exp.out / "f32.gguf").equalized  # nothing rounds an f32 file's activations
    exp.train_baseline()
    assert exp.export("f16", model="baseline").path == exp.out / "baseline-f16.gguf"


@pytest.mark.parametrize("override,cell", [("data.max_length=100", "2. Data"), ("teacher_cache.k=8", "4b. Teacher cache"),
                                           ("student.num_layers=1", "4. Student"), ("train.device=cpu", "1. Config"),
                                           ("generate.max_new_tokens=8", "3b. Teacher answers")])
def test_the_training_cell_refuses_settings_of_stages_already_built(experiment, override, cell):
    from pocket_teacher.experiment import StageAlreadyBuilt

    with pytest.raises(StageAlreadyBuilt, match=rf"{override.split('=')[0]} cannot change in the training cell: "
                                                rf"section {cell}"):
        experiment.distil([override])
    assert experiment.trained is None


def test_rerunning_cells_is_idempotent(experiment):
    exp = experiment
    teacher = exp.teacher
    exp.load_teacher()
    assert exp.teacher is teacher  # loaded once
    first = exp.distil()
    history = (exp.out / "history.jsonl").read_text()
    exp.configure()  # the configuration cell again keeps what the run wrote
    assert (exp.out / "history.jsonl").read_text() == history
    second = exp.distil()
    assert [h["loss"] for h in first.result.history] == [h["loss"] for h in second.result.history]
    assert (exp.out / "history.jsonl").read_text().count("\n") == 2
    exp.evaluate_before()
    rows = dict(exp.evaluate_before())
    assert rows["teacher"]["perplexity"] == exp.results["teacher"]["perplexity"]
    assert set(exp.timings) >= {"1. Configuration", "6. Distillation", "5. Before training"}
    table = exp.timing_table().splitlines()
    assert table[-1].startswith("total") and "planned" in table[0]  # measured beside the time plan
    # the plan's total is held against the sections it plans only, not the whole clock
    planned = exp.time_plan.seconds()
    both = [t for t in exp.timings if t in planned]
    measured_there, planned_there = table[-2].split()[2], table[-2].split()[4]
    assert table[-2].startswith("planned sections")
    assert float(measured_there) == pytest.approx(sum(exp.timings[t] for t in both), abs=0.06)
    assert float(planned_there) == pytest.approx(sum(planned[t] for t in both), abs=0.06)
    assert table[-1].split()[1] == f"{sum(exp.timings.values()):.1f}" and table[-1].split()[-1] == "-"
    assert exp.time_plan is not None and not exp.time_plan.typical_lengths  # made again once tokenized


def test_sections_need_their_inputs(tmp_path):
    from pocket_teacher.experiment import Experiment, configure

    exp = Experiment(configure("tiny", [f"run.out_dir={tmp_path}"]), progress=False)
    with pytest.raises(RuntimeError, match=r"Run section 4\. Student and tokenization first"):
        exp.distil()


def test_the_summary_is_written_from_the_results():
    from pocket_teacher.report import BASELINE_LABEL, summarize

    cfg = get_preset("tiny")
    row = {"parameters": 100e6, "perplexity": 10.0, "top1_agreement": 0.4, "accuracy": 0.5, "correct": 16,
           "questions": 32, "ci95_low": 0.33, "ci95_high": 0.67}
    results = {"teacher": dict(row, perplexity=5.0, top1_agreement=None), "student before": dict(row, perplexity=900.0),
               "student after": dict(row, parameters=30e6, perplexity=8.0, top1_agreement=0.55),
               BASELINE_LABEL: dict(row, parameters=30e6, perplexity=7.5, top1_agreement=0.5)}
    text = summarize(results, cfg, None)
    assert "30% of the teacher's" in text and "plain fine-tuning is lower" in text
    assert "55.0% after, 50.0% for plain fine-tuning" in text and "cannot tell them apart" in text


def test_preflight_warns_only_when_the_teacher_adds_little():
    from pocket_teacher.report import preflight_warnings

    strong = {"perplexity": 3.5, "accuracy": 0.6, "correct": 19, "questions": 32, "ci95_low": 0.42, "ci95_high": 0.75}
    before = {"perplexity": 2e6, "top1_agreement": 0.0}
    far = {"teacher_logprob_per_token": -11.2, "student_logprob_per_token": -4.3}  # much to correct on-policy
    assert preflight_warnings({"teacher": strong, "student before": before}, far) == []
    near = {"teacher_logprob_per_token": -4.25, "student_logprob_per_token": -4.3}
    weak = dict(strong, accuracy=1 / 32, correct=1, ci95_low=0.006, ci95_high=0.157)
    warnings = preflight_warnings({"teacher": weak, "student before": dict(before, perplexity=3.6)}, near)
    assert len(warnings) == 3 and "1/32" in warnings[1] and "as likely" in warnings[2]


@pytest.mark.parametrize("preset", ["pocket", "tiny", "t4", "a100"])
def test_the_preview_never_warms_up_longer_than_it_runs(preset):
    """The preview's warm-up is at most a quarter of its steps: it reaches the peak lr and decays from it, and a
    default run prints no warm-up warning."""
    cfg = configure(preset)
    steps = cfg.eval.on_policy_preview or 8
    preview = preview_config(cfg, steps).train
    assert preview.max_steps == steps and 4 * preview.warmup_steps <= steps
    assert preview.warmup_steps <= cfg.train.warmup_steps
    assert preview.checkpoint_every == 0 and not preview.resume


def test_evaluation_after_training_reuses_the_last_held_out_score_and_one_teacher_pass(experiment):
    """The trained students' perplexity is the training's held-out score at its last step (the same weights and
    split, not scored again) and equals a fresh one; their agreement comes from one teacher pass and equals
    `agreement` run alone; without a held-out score at the last step, evaluation scores the student itself."""
    from pocket_teacher.evaluate import agreement, perplexity

    exp = experiment
    trained = exp.distil(["train.eval_every=1"])
    exp.train_baseline()
    exp.evaluate_before()
    rows = exp.evaluate_after()
    pad, vocab = exp.tokenizer.pad_token_id, len(exp.tokenizer)
    for label, student in (("student after", trained.student), (exp.baseline_label, exp.baseline.student)):
        row = rows[label]
        assert row["perplexity_of"] == "training's held-out score at step 2"
        fresh = perplexity(student, exp.splits.eval, pad_token_id=pad, vocab_size=vocab, progress=False)
        assert row["perplexity"] == pytest.approx(fresh["perplexity"], rel=1e-5)
        assert row["answer_tokens"] == fresh["tokens"]
        alone = agreement(exp.teacher, student, exp.splits.eval, pad_token_id=pad, vocab_size=vocab, progress=False)
        assert row["top1_agreement"] == alone["top1_agreement"]
        assert row["kl_to_teacher"] == pytest.approx(alone["kl"], rel=1e-5)
    teacher = rows["teacher"]
    alone = perplexity(exp.teacher, exp.splits.eval, pad_token_id=pad, vocab_size=vocab, progress=False)
    assert teacher["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5) and "agreement" in teacher[
        "perplexity_of"]  # scored on the pass that measured the untrained student's agreement
    exp.distil()  # eval_every=0: no held-out score to reuse; the agreement pass's is
    exp.train_baseline()
    row = exp.evaluate_after()["student after"]
    assert row["perplexity_of"] == "the pass that measured its agreement"
    fresh = perplexity(exp.trained.student, exp.splits.eval, pad_token_id=pad, vocab_size=vocab, progress=False)
    assert row["perplexity"] == pytest.approx(fresh["perplexity"], rel=1e-5)


def test_after_section_5_the_teacher_never_runs_again_on_the_held_out_split(experiment):
    """Section 5's one pass of the teacher over the held-out split keeps its hidden states there: the held-out
    cache of the trainings and the trained students' agreement rebuild its logits from them (its decoder does not
    run again; the cache is on, so training does not run it either), and the untrained student's perplexity comes
    from the same pass, equal to a fresh one."""
    from pocket_teacher.evaluate import perplexity

    exp = experiment
    assert exp.cfg.teacher_cache.use
    rows = exp.evaluate_before()
    assert exp.teacher_hidden is not None and exp.teacher_hidden.serves(exp.teacher, exp.splits.eval)
    pad, vocab = exp.tokenizer.pad_token_id, len(exp.tokenizer)
    fresh = perplexity(exp.student_init, exp.splits.eval, pad_token_id=pad, vocab_size=vocab, progress=False)
    assert rows["student before"]["perplexity"] == pytest.approx(fresh["perplexity"], rel=1e-6)
    assert rows["student before"]["perplexity_of"] == "the pass that measured its agreement"
    calls = []
    hook = exp.teacher.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        exp.distil(["train.eval_every=1"])
        exp.train_baseline()
        after = exp.evaluate_after()
    finally:
        hook.remove()
    assert not calls
    assert after["student after"]["top1_agreement"] is not None and after["student after"]["kl_to_teacher"] > 0
