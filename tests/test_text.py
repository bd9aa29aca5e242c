"""Free text (data.source=text / teacher_text): loading, all-token training targets, teacher-written texts."""

import dataclasses
import json

import pytest
import torch

from pocket_teacher.data import DataError, IGNORE_INDEX, encode_example, load_examples, read_text_rows


def test_txt_paragraphs_are_split_at_blank_lines_and_named_by_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n")
    rows = read_text_rows(str(path))
    assert [r.target for r in rows] == ["First paragraph\nstill first.", "Second one.", "Third."]
    assert [r.where for r in rows] == ["t.txt:1", "t.txt:5", "t.txt:7"]


def test_jsonl_text_field_and_bad_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: no string field 'text' \(fields: body\)\. Set data\.text_column"):
        read_text_rows(str(path))
    from pocket_teacher.data import LoadReport

    report = LoadReport(source="t")
    rows = read_text_rows(str(path), bad_rows="skip", report=report)
    assert [r.target for r in rows] == ["a b c"] and report.rows == 2 and sum(report.skipped.values()) == 1
    assert [r.target for r in read_text_rows(str(path), column="body", bad_rows="skip")] == ["x"]


def test_text_split_holds_out_rows_never_trained_on(tmp_path, tiny_cfg):
    from pocket_teacher.config import apply_overrides

    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"Paragraph number {i}." for i in range(20)))
    cfg = apply_overrides(tiny_cfg, ["data.source=text", f"data.train_path={path}", "data.eval_size=5"])
    train, _ = load_examples(cfg.data, "train")
    held, _ = load_examples(cfg.data, "eval")
    assert len(held) == 5 and len(train) == 15 and not {e.target for e in train} & {e.target for e in held}


def test_free_text_trains_on_every_token(tiny_tokenizer):
    from pocket_teacher.data import text_example

    feature = encode_example(tiny_tokenizer, text_example("Some free text here.", "x"))
    assert IGNORE_INDEX not in feature["labels"] and feature["labels"] == feature["input_ids"]


def test_teacher_texts_are_sampled_reproducibly_cached_and_stopped(tiny_teacher, tiny_tokenizer, tmp_path):
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.generate import default_stop, generate_texts

    assert default_stop(tiny_tokenizer) == ["\nQuestion:"]  # a base model (no chat template) stops there
    settings = GenerateConfig(num_samples=6, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    texts, report = generate_texts(tiny_teacher, tiny_tokenizer, ["Once", "The sea"], tmp_path, settings,
                                   progress=False)
    again, second = generate_texts(tiny_teacher, tiny_tokenizer, ["Once", "The sea"], tmp_path / "other", settings,
                                   progress=False)
    assert report.status == "generated" and second.status == "generated"
    assert [t.target for t in texts] == [t.target for t in again]  # seeded
    assert [t.question for t in texts] == ["Once", "The sea"] * 3
    cached, third = generate_texts(tiny_teacher, tiny_tokenizer, ["Once", "The sea"], tmp_path, settings,
                                   progress=False)
    assert third.status == "reused" and [t.target for t in cached] == [t.target for t in texts]
    other, _ = generate_texts(tiny_teacher, tiny_tokenizer, ["Once", "The sea"], tmp_path,
                              dataclasses.replace(settings, seed=4), progress=False)
    assert [t.target for t in other] != [t.target for t in texts]
    # each batch samples from its own seeded generator, so the batching is part of the cache's fingerprint
    _, batched = generate_texts(tiny_teacher, tiny_tokenizer, ["Once", "The sea"], tmp_path,
                                dataclasses.replace(settings, batch_size=4), progress=False)
    assert batched.status == "generated" and batched.path != report.path


@pytest.mark.slow
def test_tiny_text_runs_end_to_end(tmp_path):
    from pocket_teacher.cli import main

    out = tmp_path / "tt"
    assert main(["run", "--preset", "tiny-text", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["teacher", "student before", "student after", "random init (same shape)"]
    rows = [json.loads(line) for line in (out / "side_by_side.jsonl").read_text().split("\n") if line]
    assert len(rows) == 2 and all(row["random init (same shape)"] is not None for row in rows)


@pytest.mark.slow
def test_a_local_gpt2_teacher_writes_and_a_narrower_gpt2_student_learns(tmp_path):
    """The reference system's experiment with tiny random GPT-2s: a GPT-2 teacher from a local folder writes the
    texts, a narrower GPT-2 student built from its config (random init; pruning reads Llama-style layers) trains."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocket_teacher.cli import main
    from pocket_teacher.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(1024)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=4, n_head=4,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny-text", "--set", f"teacher.source={tmp_path / 'gpt2'}", "--set",
                 "student.init=random", "--set", "student.hidden_size=32", "--set", "student.num_kv_heads=2",
                 "--set", "student.intermediate_size=96",
                 "--out", str(out), "--no-progress"]) == 0
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert type(student).__name__ == "GPT2LMHeadModel" and student.config.n_embd == 32 and student.config.n_layer == 2
    assert student.config.n_inner == 96 and student.transformer.h[0].mlp.c_fc.weight.shape == (32, 96)


def test_cached_texts_with_unicode_line_separators_are_reused_not_called_damaged(tiny_teacher, tiny_tokenizer,
                                                                                   tmp_path, capsys):
    from pocket_teacher.config import GenerateConfig
    from pocket_teacher.generate import generate_texts

    settings = GenerateConfig(num_samples=2, max_new_tokens=4, temperature=0.9, seed=1)
    texts, _ = generate_texts(tiny_teacher, tiny_tokenizer, ["A"], tmp_path, settings, progress=False)
    path = next(tmp_path.glob("texts-*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().split("\n") if line]
    rows[0]["text"] = "one\u2028two"  # json.dumps keeps U+2028 escaped; write it raw as other writers may
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    again, report = generate_texts(tiny_teacher, tiny_tokenizer, ["A"], tmp_path, settings, progress=False)
    assert report.status == "reused" and again[0].target == " one\u2028two" and "damaged" not in capsys.readouterr().out


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.95), (1.3, 0.5), (0.5, 1.0)])
def test_nucleus_sampling_keeps_what_transformers_warpers_keep(temperature, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from pocket_teacher.generate import NucleusSampling

    torch.manual_seed(0)
    scores = torch.randn(48, 3000) * torch.linspace(0.2, 12, 48)[:, None]  # flat rows (wide nuclei) to peaked ones
    ids = torch.zeros(48, 1, dtype=torch.long)
    expected = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    for candidates in (8, 256, 3000):  # fallback to the full sort for most rows, some rows, none
        got = NucleusSampling(temperature, top_p, candidates)(ids, scores)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), candidates
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_sampled_generation_is_transformers_sampling_token_for_token(tiny_teacher, tiny_tokenizer):
    from transformers import GenerationConfig, LogitsProcessorList

    from pocket_teacher.generate import NucleusSampling

    enc = tiny_tokenizer(["Question: 3 + 4?", "Question: 10 - 2?"], return_tensors="pt", padding=True)
    common = dict(do_sample=True, top_k=0, max_new_tokens=12, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(7)
    theirs = tiny_teacher.generate(**enc, generation_config=GenerationConfig(temperature=0.8, top_p=0.9, **common))
    torch.manual_seed(7)
    ours = tiny_teacher.generate(**enc, generation_config=GenerationConfig(temperature=1.0, top_p=1.0, **common),
                                 logits_processor=LogitsProcessorList([NucleusSampling(0.8, 0.9)]))
    assert torch.equal(theirs, ours)


@pytest.mark.slow
def test_the_text_notebook_runs_on_tiny_text(tmp_path):
    """Pocket_Teacher_Text.ipynb on the tiny-text preset: every cell runs, the perplexity bars compare the teacher,
    the student before and after and the random-init student, and the side by side shows all four models."""
    pytest.importorskip("nbclient")
    import nbformat

    from pocket_teacher.cli import NOTEBOOK, main

    notebook = NOTEBOOK.parent / "Pocket_Teacher_Text.ipynb"
    out = tmp_path / "tt"
    assert main(["notebook", "--notebook", str(notebook), "--preset", "tiny-text", "--out", str(out)]) == 0
    nb = nbformat.read(out / "Pocket_Teacher_Text.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    for name in ("--- teacher:", "--- student before:", "--- student after:", "--- random init (same shape):"):
        assert name in text
    bars = next(c for c in code if "exp.plots()" in c.source)
    assert any("image/png" in o.get("data", {}) for o in bars.outputs)
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["teacher", "student before", "student after", "random init (same shape)"]


def test_an_empty_prompt_is_refused_by_name_not_by_an_index_error(tiny_teacher, tiny_tokenizer):
    from pocket_teacher.generate import generate

    with pytest.raises(ValueError, match=r"prompts \[1\] are empty.*free text: its opening words"):
        generate(tiny_teacher, tiny_tokenizer, ["Once upon", ""], progress=False)


def test_held_out_teacher_texts_continue_prompts_training_never_sees():
    """Free text scores every token, its prompt included: held-out texts must not share a prompt with training.
    Whole prompts are held out (seeded) until data.eval_size texts are; too few prompts is an error with the fix."""
    from pocket_teacher.data import DataError, Example, hold_out_prompts

    texts = [Example(question=f"Prompt {p}.", target=f" text {i}", answer="", where=f"#{p}.{i}")
             for p in range(6) for i in range(5 + p)]
    train, held, note = hold_out_prompts(texts, eval_size=12, seed=1)
    assert not {t.question for t in train} & {t.question for t in held}
    assert len(held) >= 12 and len(train) + len(held) == len(texts)
    assert {t.where for t in train} | {t.where for t in held} == {t.where for t in texts}
    assert note.startswith(f"{len(held)} held out: every text of ") and "none of them in training" in note
    again = hold_out_prompts(texts, eval_size=12, seed=1)
    assert [t.where for t in again[1]] == [t.where for t in held] and [t.where for t in again[0]] == \
        [t.where for t in train]
    assert len({frozenset(t.question for t in hold_out_prompts(texts, 12, seed=s)[1]) for s in range(6)}) > 1
    with pytest.raises(DataError, match="Give more prompts"):
        hold_out_prompts([t for t in texts if t.question == "Prompt 0."], eval_size=2, seed=0)


def test_a_text_source_without_a_path_or_with_too_few_paragraphs_names_the_fix_which_works(tmp_path, tiny_cfg):
    from pocket_teacher.config import apply_overrides

    with pytest.raises(DataError, match="data.source=text needs data.train_path"):
        load_examples(apply_overrides(tiny_cfg, ["data.source=text"]).data, "train")
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"Paragraph number {i}." for i in range(6)))
    few = apply_overrides(tiny_cfg, ["data.source=text", f"data.train_path={path}", "data.eval_size=6"])
    with pytest.raises(DataError, match="6 paragraphs, not more than data.eval_size=6; lower data.eval_size or give "
                                        "data.eval_path"):
        load_examples(few.data, "train")
    lower = apply_overrides(few, ["data.eval_size=2"])  # the advice, followed: either way
    assert len(load_examples(lower.data, "train")[0]) == 4 and len(load_examples(lower.data, "eval")[0]) == 2
    held = tmp_path / "held.txt"
    held.write_text("One held-out paragraph.\n\nAnother.")
    given = apply_overrides(few, [f"data.eval_path={held}"])
    assert len(load_examples(given.data, "train")[0]) == 6 and len(load_examples(given.data, "eval")[0]) == 2


def test_when_no_teacher_answer_is_kept_the_advice_to_keep_all_works(tmp_path):
    from pocket_teacher.experiment import Experiment, configure

    def answers(targets):
        exp = Experiment(configure("tiny", [f"run.out_dir={tmp_path}", f"data.targets={targets}", "data.train_size=8",
                                            "generate.max_new_tokens=8"]), progress=False)
        for method in ("configure", "load_data", "load_teacher"):
            getattr(exp, method)()
        return exp.teacher_answers()

    with pytest.raises(DataError, match="none of the teacher's 8 answers was kept .* Use data.targets=teacher"):
        answers("teacher_correct")  # a random tiny teacher gets no final number right
    kept = answers("teacher")  # the advice, followed
    assert len(kept.train) == 8 and all(e.where.endswith("(teacher answer)") for e in kept.train)
