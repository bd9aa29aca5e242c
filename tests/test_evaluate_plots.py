"""pocket_teacher.evaluate and pocket_teacher.plots."""

import math

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pocket_teacher.data import Example, PaddingCollator, load_gsm_symbolic, tokenize_examples
from pocket_teacher.evaluate import generate, gsm8k_accuracy, perplexity, results_table, wilson_interval
from pocket_teacher.plots import plot_quality, plot_training, save_figure


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    low, high = wilson_interval(81, 100)
    assert low == pytest.approx(0.7222, abs=1e-4) and high == pytest.approx(0.8749, abs=1e-4)


def test_perplexity_matches_manual(tiny_teacher, tiny_tokenizer):
    examples, _ = load_gsm_symbolic(5, seed=4)
    split = tokenize_examples(examples, tiny_tokenizer, max_length=384)
    got = perplexity(tiny_teacher, split, pad_token_id=tiny_tokenizer.pad_token_id, batch_size=2, progress=False)
    nll, n = 0.0, 0
    for feat in split.features:  # one at a time, full logits, no padding
        batch = PaddingCollator(0)([feat])
        logits = tiny_teacher(input_ids=batch["input_ids"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        nll += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        n += int((labels != -100).sum())
    assert got["tokens"] == n == split.answer_tokens
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_batched_generation_equals_one_by_one(tiny_teacher, tiny_tokenizer):
    prompts = ["Question: What is 2+2?\nAnswer: ", "Question: Tom has 3 apples and buys 12 more. How many?\nAnswer: ",
               "Question: x\nAnswer: "]
    batched = generate(tiny_teacher, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate(tiny_teacher, tiny_tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0]
              for p in prompts]
    assert batched == single and any(batched)
    assert tiny_tokenizer.padding_side == "right"  # restored


def test_accuracy_counts_correct_rows(monkeypatch, tiny_teacher, tiny_tokenizer):
    import pocket_teacher.evaluate as ev

    examples = [Example(f"q{i}", "t", str(i), f"r{i}") for i in range(4)]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ["The answer is 0.", "#### 1", "2.0", "no idea"])
    out = gsm8k_accuracy(tiny_teacher, tiny_tokenizer, examples, progress=False)
    assert out["correct"] == 3 and out["accuracy"] == 0.75 and out["ci95"] == wilson_interval(3, 4)
    assert [r["extracted"] for r in out["rows"]] == ["0", "1", "2", None]


RESULTS = [{"model": "teacher", "parameters": 2e6, "perplexity": 4.0, "accuracy": 0.2, "correct": 2, "questions": 10,
            "ci95_low": 0.05, "ci95_high": 0.5},
           {"model": "student before", "parameters": 1e6, "perplexity": 9e5, "accuracy": 0.0, "correct": 0,
            "questions": 10, "ci95_low": 0.0, "ci95_high": 0.28},
           {"model": "student after", "parameters": 1e6, "perplexity": 6.0, "accuracy": 0.1, "correct": 1,
            "questions": 10, "ci95_low": 0.02, "ci95_high": 0.4}]


def test_plots_return_figures_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = [{"step": i, "loss": 3 - i / 10, "ce": 2, "kd": 1, "lr": 1e-3} for i in range(1, 11)]
    figs = [plot_quality(RESULTS), plot_training(history)]
    assert all(isinstance(f, Figure) for f in figs) and list(tmp_path.iterdir()) == []
    written = save_figure(figs[0], tmp_path / "a" / "q.png")
    assert written[0].stat().st_size > 1000


def test_results_table():
    table = results_table(RESULTS)
    assert list(table.index) == ["teacher", "student before", "student after"]
    assert table.loc["teacher", "params (M)"] == 2.0
