"""pocket_teacher.evaluate and pocket_teacher.plots."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pocket_teacher.data import Example, PaddingCollator, load_gsm_symbolic, tokenize_examples
from pocket_teacher.config import GenerateConfig
from pocket_teacher.evaluate import generate, gsm8k_accuracy, perplexity, wilson_interval
from pocket_teacher.report import results_markdown, results_table
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
    batched = generate(tiny_teacher, tiny_tokenizer, prompts, GenerateConfig(max_new_tokens=12, batch_size=3),
                       progress=False)
    single = [generate(tiny_teacher, tiny_tokenizer, [p], GenerateConfig(max_new_tokens=12, batch_size=1),
                       progress=False)[0]
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


# -- MMLU letter scoring ----------------------------------------------------------------------------------------

from pocket_teacher.data import mmlu_example  # noqa: E402
from pocket_teacher.evaluate import (PeakMemory, agreement, efficiency, letter_token_ids, mmlu_accuracy,  # noqa: E402
                                     mmlu_prompt)
from pocket_teacher.plots import plot_mmlu_subjects, plot_size_quality  # noqa: E402


def _mmlu(n=8, subjects=("astronomy", "virology")):
    return [mmlu_example({"question": f"Which is item {i}?", "subject": subjects[i % len(subjects)],
                          "choices": [f"c{i}a", f"c{i}b", f"c{i}c", f"c{i}d"], "answer": i % 4}, f"mmlu.jsonl:{i + 1}")
            for i in range(n)]


def test_mmlu_prompt_is_the_standard_format():
    questions = _mmlu()
    text = mmlu_prompt(questions[2], shots=[questions[0]])
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert "Which is item 0?\nA. c0a\nB. c0b\nC. c0c\nD. c0d\nAnswer: A\n\n" in text
    assert text.endswith("Which is item 2?\nA. c2a\nB. c2b\nC. c2c\nD. c2d\nAnswer:")


def _prefers(model, token_id):
    """Make `model` put almost all its next-token mass on `token_id` whatever the input."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    with torch.no_grad():
        head.bias[token_id] = 20.0
    return model


def test_letter_scoring_picks_the_letter_the_model_prefers(tiny_teacher, tiny_tokenizer):
    letters = letter_token_ids(tiny_tokenizer)
    assert len(set(letters)) == 4
    model = _prefers(tiny_teacher, letters[2])  # always "C"
    questions = _mmlu(8)
    out = mmlu_accuracy(model, tiny_tokenizer, questions, batch_size=3, progress=False)
    assert [r["predicted"] for r in out["rows"]] == ["C"] * 8
    assert out["correct"] == 2 and out["total"] == 8 and out["accuracy"] == 0.25  # answers C at i = 2, 6
    assert out["ci95"] == wilson_interval(2, 8)
    assert out["per_subject"]["astronomy"]["correct"] == 2 and out["per_subject"]["virology"]["correct"] == 0
    assert out["macro"] == pytest.approx(0.25)
    assert all(max(r["letter_logprobs"]) == r["letter_logprobs"][2] for r in out["rows"])
    assert out["predicted_letters"] == {"A": 0, "B": 0, "C": 8, "D": 0} and out["favourite_letter"] == "C"
    assert out["favourite_letter_accuracy"] == 2 / 8  # gold is C for 2 of 8: always-C scores exactly that


def test_mmlu_subsets_shots_and_length_limit(tiny_teacher, tiny_tokenizer):
    questions = _mmlu(12)
    only = mmlu_accuracy(tiny_teacher, tiny_tokenizer, [q for q in questions if q.subject == "virology"][:4],
                         shot_pool=questions, progress=False)
    assert only["total"] == 4 and set(only["per_subject"]) == {"virology"}
    few = mmlu_accuracy(tiny_teacher, tiny_tokenizer, questions, shots=3, progress=False)
    assert few["shots"] == 3 and few["shots_dropped"] == 0
    short = mmlu_accuracy(tiny_teacher, tiny_tokenizer, questions, shots=3, max_length=60, progress=False)
    assert short["shots_dropped"] > 0  # prompts over the limit lose shots, counted


def test_mmlu_batched_scores_equal_one_by_one(tiny_teacher, tiny_tokenizer):
    questions = _mmlu(6)
    batched = mmlu_accuracy(tiny_teacher, tiny_tokenizer, questions, batch_size=6, progress=False)
    single = mmlu_accuracy(tiny_teacher, tiny_tokenizer, questions, batch_size=1, progress=False)
    for a, b in zip(batched["rows"], single["rows"]):
        assert a["predicted"] == b["predicted"]
        assert a["letter_logprobs"] == pytest.approx(b["letter_logprobs"], abs=1e-3)


def test_gsm8k_few_shot_prompts_show_the_shots(monkeypatch, tiny_teacher, tiny_tokenizer):
    import pocket_teacher.evaluate as ev

    seen = {}

    def fake_generate(model, tokenizer, prompts, settings=None, **kwargs):
        seen["prompts"], seen["stop"] = prompts, kwargs.get("stop")
        return ["#### 1"] * len(prompts)

    monkeypatch.setattr(ev, "generate", fake_generate)
    shots = [Example("What is 1+1?", "1+1 = 2\n#### 2", "2", "s1")]
    gsm8k_accuracy(tiny_teacher, tiny_tokenizer, [Example("q", "t", "1", "r")], shots=shots, progress=False)
    assert "Question: What is 1+1?\nAnswer: 1+1 = 2\n#### 2\n\nQuestion: q\nAnswer:" == seen["prompts"][0]
    assert seen["stop"] == ("\nQuestion:",)  # plain template: stop before the model invents the next question


def test_agreement_with_itself_is_perfect(tiny_teacher, tiny_tokenizer):
    examples, _ = load_gsm_symbolic(4, seed=4)
    split = tokenize_examples(examples, tiny_tokenizer, max_length=384)
    out = agreement(tiny_teacher, tiny_teacher, split, pad_token_id=tiny_tokenizer.pad_token_id, progress=False)
    assert out["top1_agreement"] == 1.0 and abs(out["kl"]) < 1e-6 and out["tokens"] == split.answer_tokens


def test_efficiency_report(tiny_teacher, tiny_tokenizer):
    out = efficiency(tiny_teacher, tiny_tokenizer, new_tokens=4, batch_sizes=(1, 16), repeats=1)
    embed = tiny_teacher.get_input_embeddings().weight.numel()
    assert out["parameters"] - out["parameters_no_embeddings"] == embed
    assert out["size_on_disk"] >= 4 * out["parameters_no_embeddings"]
    assert out["latency_ms_per_token"] > 0 and out["tokens_per_s_batch16"] > 0


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if peak.bytes is None:
        pytest.skip("peak RSS cannot be reset on this OS")
    assert peak.bytes >= 48 * 2**20


def test_new_plots_return_figures_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [dict(r, latency_ms_per_token=10.0 + i, mmlu=0.3, mmlu_macro=0.3,
                 mmlu_per_subject={"astronomy": {"accuracy": 0.3, "ci95": (0.1, 0.6), "correct": 3, "total": 10}})
            for i, r in enumerate(RESULTS)]
    figs = [plot_size_quality(rows), plot_size_quality(rows, x="latency"), plot_mmlu_subjects(rows),
            plot_training([{"step": 1, "loss": 2.0, "ce": 2.0, "kd": None, "lr": 1e-3}],
                          baseline=[{"step": 1, "loss": 2.1, "ce": 2.1, "kd": 3.0, "lr": 1e-3}])]
    assert all(isinstance(f, Figure) for f in figs) and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="mmlu_source"):
        plot_mmlu_subjects(RESULTS)


def test_results_markdown_shows_intervals():
    text = results_markdown(RESULTS)
    assert "| teacher | 2.0 | 4.00 | 20.0% (5.0-50.0), 2/10 | - |" in text and text.count("\n") == 4


def test_greedy_ignores_the_models_sampling_and_repetition_settings(tiny_teacher, tiny_tokenizer):
    """A model whose generation config samples and penalises repeats (as Qwen2.5-Instruct's does) still decodes
    greedily: the output is the argmax path, computed here by hand, and the results say what was overridden."""
    from pocket_teacher.evaluate import overridden_generation_settings

    config = tiny_teacher.generation_config
    config.do_sample, config.temperature, config.top_k, config.repetition_penalty = True, 0.7, 20, 1.5
    config.no_repeat_ngram_size = 2
    prompt = "Question: What is 2+2?\nAnswer: "
    torch.manual_seed(123)
    got = generate(tiny_teacher, tiny_tokenizer, [prompt], GenerateConfig(max_new_tokens=10), progress=False)[0]
    ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(10):
            nxt = tiny_teacher(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if int(nxt) == tiny_tokenizer.eos_token_id:
                break
    expected = tiny_tokenizer.decode(ids[0, -10:], skip_special_tokens=True).strip()
    assert got == expected
    overridden = overridden_generation_settings(tiny_teacher)
    assert overridden["repetition_penalty"] == 1.5 and overridden["do_sample"] is True


def test_agreement_and_perplexity_slice_padded_rows_and_match_full_logits(tiny_teacher, tiny_tokenizer):
    """Chunked on the device: the same KL and agreement as the full (N, V) computation over the first V logits."""
    from pocket_teacher.batches import answer_logits, answer_positions
    from pocket_teacher.models import derive_student

    student = derive_student(tiny_teacher, num_layers=2).eval()
    examples, _ = load_gsm_symbolic(6, seed=5)
    split = tokenize_examples(examples, tiny_tokenizer, max_length=384)
    vocab = len(tiny_tokenizer) - 7  # pretend the last rows are an output layer's padding
    got = agreement(tiny_teacher, student, split, pad_token_id=tiny_tokenizer.pad_token_id, vocab_size=vocab,
                    batch_size=4, progress=False)
    batch = PaddingCollator(tiny_tokenizer.pad_token_id)([split[i] for i in range(len(split))])
    select = answer_positions(batch["labels"])
    with torch.no_grad():
        t = answer_logits(tiny_teacher, batch["input_ids"], batch["attention_mask"], select)[:, :vocab]
        s = answer_logits(student, batch["input_ids"], batch["attention_mask"], select)[:, :vocab]
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    assert got["kl"] == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum() / t.shape[0]), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(float((t.argmax(-1) == s.argmax(-1)).float().mean()))
    ppl = perplexity(student, split, pad_token_id=tiny_tokenizer.pad_token_id, batch_size=4, progress=False)
    with torch.no_grad():
        full = answer_logits(student, batch["input_ids"], batch["attention_mask"], select)
    targets = batch["labels"][:, 1:][select[:, :-1]]
    assert ppl["nll"] == pytest.approx(float(F.cross_entropy(full, targets)), rel=1e-4)


def test_eval_batches_respect_a_token_budget():
    from pocket_teacher.batches import length_batches as eval_batches

    lengths = [10, 50, 20, 40, 30, 60]
    batches = eval_batches(lengths, batch_size=4, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1 for b in batches)
    assert all(len(b) <= 4 for b in eval_batches(lengths, batch_size=4))


def test_mmlu_cloze_scores_are_the_choice_log_likelihoods(tiny_teacher, tiny_tokenizer):
    """Each choice's score is the summed log-prob of its tokens after the context (one forward per pair, by
    hand); acc takes the largest sum, acc_norm the largest per character; batching changes nothing."""
    from pocket_teacher.data import mmlu_example
    from pocket_teacher.evaluate import encode_pair, mmlu_cloze_accuracy, mmlu_cloze_context

    rows = [{"question": f"Item {i}?", "subject": "virology" if i % 2 else "astronomy",
             "choices": ["a", "bb bb bb bb", "ccc", "d d"], "answer": i % 4} for i in range(5)]
    examples = [mmlu_example(r, f"t:{i}") for i, r in enumerate(rows)]
    out = mmlu_cloze_accuracy(tiny_teacher, tiny_tokenizer, examples, batch_size=3, progress=False)
    one = mmlu_cloze_accuracy(tiny_teacher, tiny_tokenizer, examples, batch_size=1, progress=False)
    for e, row, single in zip(examples, out["rows"], one["rows"]):
        context = mmlu_cloze_context(e)
        for choice, got, alone in zip(e.choices, row["choice_loglik"], single["choice_loglik"]):
            ctx, cont = encode_pair(tiny_tokenizer, context, " " + choice)
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(tiny_teacher(ids).logits[0, :-1].float(), -1)
            manual = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert got == pytest.approx(manual, abs=2e-3) and alone == pytest.approx(got, abs=2e-3)
        norm = [ll / len(c) for ll, c in zip(row["choice_loglik"], e.choices)]
        assert row["predicted"] == "ABCD"[max(range(4), key=row["choice_loglik"].__getitem__)]
        assert row["predicted_norm"] == "ABCD"[max(range(4), key=norm.__getitem__)]
    assert out["accuracy"] == sum(r["correct"] for r in out["rows"]) / 5
    assert set(out["per_subject"]) == {"astronomy", "virology"}


def test_mmlu_format_auto_reports_both_for_small_models(tiny_teacher, tiny_tokenizer, tiny_cfg):
    from pocket_teacher.config import apply_overrides
    from pocket_teacher.data import mmlu_example
    from pocket_teacher.evaluate import mmlu_formats, mmlu_scores

    assert mmlu_formats(tiny_cfg.eval, 135_000_000) == ("letter", "cloze")
    assert mmlu_formats(tiny_cfg.eval, 7_000_000_000) == ("letter",)
    examples = [mmlu_example({"question": "Q?", "subject": "s", "choices": list("wxyz"), "answer": 2}, "t:0")]
    row = mmlu_scores(tiny_teacher, tiny_tokenizer, examples, tiny_cfg.eval, "m", progress=False)
    assert {"mmlu", "mmlu_cloze", "mmlu_cloze_norm"} <= set(row)
    cloze_only = apply_overrides(tiny_cfg, ["eval.mmlu_format=cloze"]).eval
    assert "mmlu" not in mmlu_scores(tiny_teacher, tiny_tokenizer, examples, cloze_only, "m", progress=False)


def test_one_teacher_pass_gives_each_students_agreement(tiny_teacher, tiny_tokenizer):
    """evaluate.agreements: the teacher runs once per batch for several students; each student's figures equal its
    own `agreement`, a student equal to the teacher agrees fully, and the teacher's perplexity comes with them."""
    from pocket_teacher.evaluate import agreements
    from pocket_teacher.models import derive_student

    examples, _ = load_gsm_symbolic(6, seed=5)
    split = tokenize_examples(examples, tiny_tokenizer, max_length=384)
    students = {"two": derive_student(tiny_teacher, num_layers=2).eval(),
                "one": derive_student(tiny_teacher, num_layers=1).eval(), "same": tiny_teacher}
    pad, vocab = tiny_tokenizer.pad_token_id, len(tiny_tokenizer) - 7
    got = agreements(tiny_teacher, students, split, pad_token_id=pad, vocab_size=vocab, batch_size=4, progress=False)
    for label, student in students.items():
        alone = agreement(tiny_teacher, student, split, pad_token_id=pad, vocab_size=vocab, batch_size=4,
                          progress=False)
        assert got.students[label]["tokens"] == alone["tokens"] == split.answer_tokens
        assert got.students[label]["top1_agreement"] == alone["top1_agreement"]
        assert got.students[label]["kl"] == pytest.approx(alone["kl"], rel=1e-6, abs=1e-9)
    assert got.students["same"]["top1_agreement"] == 1.0 and got.students["two"]["kl"] > 0
    alone = perplexity(tiny_teacher, split, pad_token_id=pad, vocab_size=vocab, progress=False)
    assert got.teacher["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)  # scored on the same pass
    assert got.teacher["tokens"] == alone["tokens"]


def test_kept_teacher_states_replace_its_pass_and_the_students_perplexity_comes_with_it(tiny_teacher,
                                                                                         tiny_tokenizer):
    """evaluate.agreements(keep_teacher=True) keeps the teacher's held-out answer-position hidden states; a later
    pass given them runs no teacher decoder and gives the same figures; each student's perplexity from the pass
    equals `perplexity`; states of another split or teacher are refused."""
    from pocket_teacher.evaluate import agreements
    from pocket_teacher.models import derive_student

    split = tokenize_examples(load_gsm_symbolic(6, seed=5)[0], tiny_tokenizer, max_length=384)
    other = tokenize_examples(load_gsm_symbolic(5, seed=9)[0], tiny_tokenizer, max_length=384)
    students = {"two": derive_student(tiny_teacher, num_layers=2).eval(),
                "one": derive_student(tiny_teacher, num_layers=1).eval()}
    pad, vocab = tiny_tokenizer.pad_token_id, len(tiny_tokenizer) - 7
    first = agreements(tiny_teacher, students, split, pad_token_id=pad, vocab_size=vocab, batch_size=4,
                       progress=False, keep_teacher=True)
    kept = first.teacher_hidden
    assert kept is not None and kept.hidden.shape == (split.answer_tokens, tiny_teacher.config.hidden_size)
    assert kept.serves(tiny_teacher, split) and not kept.serves(tiny_teacher, other)
    assert not kept.serves(students["two"], split)
    calls = []
    hook = tiny_teacher.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        again = agreements(tiny_teacher, students, split, pad_token_id=pad, vocab_size=vocab, batch_size=3,
                           progress=False, teacher_hidden=kept)
    finally:
        hook.remove()
    assert not calls  # the teacher's decoder did not run
    for label, student in students.items():
        assert again.students[label]["top1_agreement"] == pytest.approx(first.students[label]["top1_agreement"],
                                                                         abs=0.02)  # other batch shapes: near-ties
        assert again.students[label]["kl"] == pytest.approx(first.students[label]["kl"], rel=1e-5)
        alone = perplexity(student, split, pad_token_id=pad, vocab_size=vocab, progress=False)
        assert first.students[label]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
        assert first.students[label]["tokens"] == alone["tokens"]
    assert again.teacher["perplexity"] == pytest.approx(first.teacher["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match="another teacher or split"):
        agreements(tiny_teacher, students, other, pad_token_id=pad, vocab_size=vocab, progress=False,
                   teacher_hidden=kept)


def test_one_pass_counts_the_positions_it_scores_on_free_text(tiny_teacher, tiny_tokenizer):
    """On free text every token is a target, but the first has no position predicting it: the teacher's and each
    student's perplexity from `agreements` divide by the positions scored, as `perplexity` does."""
    from pocket_teacher.data import Example
    from pocket_teacher.evaluate import agreements
    from pocket_teacher.models import derive_student

    texts = [Example(question=f"Once {i}", target=f" there was a number {i * 7} and it grew.", answer="",
                     where=f"#{i}") for i in range(5)]
    split = tokenize_examples(texts, tiny_tokenizer, max_length=64)
    student = derive_student(tiny_teacher, num_layers=1).eval()
    pad, vocab = tiny_tokenizer.pad_token_id, len(tiny_tokenizer) - 7
    got = agreements(tiny_teacher, {"s": student}, split, pad_token_id=pad, vocab_size=vocab, progress=False)
    for model, row in ((tiny_teacher, got.teacher), (student, got.students["s"])):
        alone = perplexity(model, split, pad_token_id=pad, vocab_size=vocab, progress=False)
        assert row["tokens"] == alone["tokens"] and row["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)


def test_an_evaluation_reuses_what_the_run_measured(monkeypatch, tiny_teacher, tiny_tokenizer, tiny_cfg):
    """evaluate.Known: a model of an architecture already timed takes those speed figures (and names whose), a
    perplexity already taken is not taken again, and a known agreement is used as given."""
    import pocket_teacher.evaluate as ev
    from pocket_teacher.models import derive_student

    split = tokenize_examples(load_gsm_symbolic(4, seed=4)[0], tiny_tokenizer, max_length=384)
    cfg = dataclasses.replace(tiny_cfg.eval, generate_samples=0, efficiency=True, agreement=True)
    before, after = derive_student(tiny_teacher, num_layers=2), derive_student(tiny_teacher, num_layers=2)
    other = derive_student(tiny_teacher, num_layers=1)
    timed = []
    real = ev.efficiency
    monkeypatch.setattr(ev, "efficiency", lambda model, tok: timed.append(model) or real(
        model, tok, new_tokens=2, batch_sizes=(1, 16), repeats=1))
    known = ev.Known(teacher=tiny_teacher)
    first = ev.evaluate_model("student before", before, tiny_tokenizer, split, cfg, progress=False, known=known)
    second = ev.evaluate_model("student after", after, tiny_tokenizer, split, cfg, progress=False, known=known)
    third = ev.evaluate_model("smaller", other, tiny_tokenizer, split, cfg, progress=False, known=known)
    assert timed == [before, other]  # the same architecture is timed once
    assert second["efficiency_of"] == "student before" and "efficiency_of" not in third
    assert second["latency_ms_per_token"] == first["latency_ms_per_token"]
    scored = {"perplexity": 12.5, "tokens": split.answer_tokens, "from": "training's held-out score at step 8"}
    monkeypatch.setattr(ev, "perplexity", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(ev, "agreement", lambda *a, **k: pytest.fail("measured again"))
    row = ev.evaluate_model("student after", after, tiny_tokenizer, split, cfg, progress=False,
                            known=ev.Known(known.speed, scored, {"top1_agreement": 0.5, "kl": 1.25}))
    assert (row["perplexity"], row["perplexity_of"], row["top1_agreement"], row["kl_to_teacher"]) == (
        12.5, "training's held-out score at step 8", 0.5, 1.25)
