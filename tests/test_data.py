"""pocket_teacher.data: sources, validation errors, formatting, prompt masking, padding, answer extraction."""

import json

import pytest

from pocket_teacher.data import (IGNORE_INDEX, DataError, Example, PaddingCollator, answers_match, encode_example,
                                 extract_gsm8k_answer, format_prompt, load_gsm8k, load_gsm_symbolic, load_mmlu,
                                 normalize_number, tokenize_examples)
from pocket_teacher.hub import HubUnavailableError


@pytest.mark.parametrize("text,expected", [
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is 1,234.", "1234"),
    ("So she makes $18 every day.", "18"),
    ("The temperature drops to -3.5 degrees.", "-3.5"),
    ("It costs $1,200.50 in total", "1200.5"),
    ("Answer: 18.00", "18"),
    ("First 3 apples, then 5 more, so 8 apples. The answer is 8.", "8"),
    ("He had 10 - 3 = 7 left", "7"),
    ("3 + 4 = 7 #### 7\n\nMore text with 99", "7"),
    ("\\boxed{42} is what we get, not 41", "42"),
    ("The answer is: $ -12", "-12"),
    ("The result is 0.50", "0.5"),
    ("There is no number here.", None),
    ("", None),
    ("Total: 1,000,000 dollars", "1000000"),
    ("5 apples cost 2.5 each: 12.5", "12.5"),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_normalize_and_match():
    assert normalize_number("1,234.00") == "1234" and normalize_number("abc") is None
    assert answers_match("18", "18.0") and not answers_match(None, "1") and not answers_match("17", "18")


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_gsm8k_local_and_strip_calculator(tmp_path):
    path = _write(tmp_path, "gsm.jsonl", [{"question": "Q1?", "answer": "2 * 3 = <<2*3=6>>6 apples\n#### 6"}])
    examples, report = load_gsm8k(path=str(path))
    assert examples[0].answer == "6" and "<<" not in examples[0].target and examples[0].target.endswith("#### 6")
    assert examples[0].where == "gsm.jsonl:1" and report.kept == 1


@pytest.mark.parametrize("row,match", [
    ({"question": "Q?"}, r"gsm.jsonl:2: missing field 'answer'"),
    ({"question": "Q?", "answer": "It is seven.\n#### seven"}, r"gsm.jsonl:2: .*'#### seven', which is not a number"),
    ({"question": "Q?", "answer": "no final line"}, r"gsm.jsonl:2: .*no '#### <number>'"),
    ({"question": "", "answer": "#### 1"}, r"gsm.jsonl:2: field 'question' must be a non-empty string"),
    ("{not json", r"gsm.jsonl:2: not valid JSON \(Expecting property name.*column 2\)"),
])
def test_gsm8k_bad_rows_name_file_line_and_fix(tmp_path, row, match):
    path = _write(tmp_path, "gsm.jsonl", [{"question": "ok?", "answer": "#### 1"}, row])
    with pytest.raises(DataError, match=match):
        load_gsm8k(path=str(path))


def test_bad_rows_skip_is_counted(tmp_path):
    path = _write(tmp_path, "gsm.jsonl", [{"question": "ok?", "answer": "#### 1"}, {"question": "Q?"}, "{bad"])
    examples, report = load_gsm8k(path=str(path), bad_rows="skip")
    assert len(examples) == 1 and report.rows == 3 and report.skipped == {"malformed": 2}
    assert "1 of 3 rows kept" in str(report)


def test_load_mmlu_local_and_errors(tmp_path):
    good = {"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3}
    path = _write(tmp_path, "mmlu.jsonl", [good, dict(good, subject="bio")])
    examples, _ = load_mmlu(path=str(path), subjects=["math"])
    assert len(examples) == 1 and examples[0].answer == "D" and "D. 4" in examples[0].question
    bad = _write(tmp_path, "bad.jsonl", [dict(good, answer=4)])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer' must be an integer 0-3"):
        load_mmlu(path=str(bad))
    bad = _write(tmp_path, "bad2.jsonl", [dict(good, choices=["a", "b"])])
    with pytest.raises(DataError, match=r"bad2.jsonl:1: field 'choices' must be a list of 4 strings"):
        load_mmlu(path=str(bad))


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_gsm8k(path=str(tmp_path / "nope.jsonl"))


def test_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-pocket-teacher-cache")
    with pytest.raises(HubUnavailableError, match="local JSONL"):
        load_gsm8k("test")


def test_gsm_symbolic_is_seeded_and_disjoint():
    a, _ = load_gsm_symbolic(20, seed=1)
    b, _ = load_gsm_symbolic(20, seed=1)
    c, _ = load_gsm_symbolic(20, seed=2)
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    assert all(e.target.endswith(f"#### {e.answer}") for e in a)
    assert all(extract_gsm8k_answer(e.target) == e.answer for e in a)


def test_held_out_questions_are_removed_from_training():
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.experiment import load_data

    train, report = load_gsm_symbolic(600, seed=1)
    held, _ = load_gsm_symbolic(64, seed=2)
    overlap = len({e.question for e in held} & {e.question for e in train})
    assert overlap > 0  # the generator repeats problems across seeds: the reason for the filter
    raw = load_data(apply_overrides(get_preset("tiny"), {"data.train_size": 600, "data.eval_size": 64}))
    assert not {e.question for e in raw.eval} & {e.question for e in raw.train}
    assert len(raw.eval) == 64 and len(raw.train) == 600 - overlap
    assert raw.reports[0].skipped == {"also in the held-out split": overlap}


def test_format_prompt_plain_and_chat(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    assert format_prompt(tiny_tokenizer, "What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert format_prompt(tiny_tokenizer, "Q", "Be brief.").startswith("Be brief.\n\nQuestion: Q")

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    assert format_prompt(Chat(), "Q", "S") == "<system>S<user>Q<assistant>"


def test_prompt_tokens_are_masked(tiny_tokenizer):
    ex = Example(question="What is 2+2?", target="2+2=4\n#### 4", answer="4", where="t")
    feat = encode_example(tiny_tokenizer, ex)
    n_prompt = len(tiny_tokenizer(format_prompt(tiny_tokenizer, ex.question), add_special_tokens=False)["input_ids"])
    assert feat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]
    answer = tiny_tokenizer.decode(feat["input_ids"][n_prompt:])
    assert answer == " " + ex.target + tiny_tokenizer.eos_token  # the plain template's space opens the answer
    prompt = tiny_tokenizer.decode(feat["input_ids"][:n_prompt])
    assert prompt.endswith("Answer:")  # never a lone trailing space token


def test_overlong_policies(tiny_tokenizer):
    examples = [Example("short?", "1\n#### 1", "1", "a"), Example("long " * 80 + "?", "x " * 200, "2", "row-b")]
    split = tokenize_examples(examples, tiny_tokenizer, max_length=64, overlong="skip")
    assert len(split) == 1 and split.report.skipped == {"longer than 64 tokens": 1}
    with pytest.raises(DataError, match=r"row-b: \d+ tokens is longer than data.max_length=64"):
        tokenize_examples(examples, tiny_tokenizer, max_length=64, overlong="error")
    examples[1] = Example("mid?", "y " * 200, "2", "row-c")
    split = tokenize_examples(examples, tiny_tokenizer, max_length=64, overlong="truncate")
    assert len(split) == 2 and max(len(f["input_ids"]) for f in split.features) == 64
    assert split.report.skipped == {"truncated to 64 tokens (kept)": 1}


def test_collator_pads_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = PaddingCollator(0, "right")(feats)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = PaddingCollator(0, "left")(feats)
    assert left["input_ids"].tolist()[1] == [0, 0, 8] and left["attention_mask"].tolist()[1] == [0, 0, 1]


def test_real_gsm8k_and_mmlu_files_load(shared_data):
    gsm, report = load_gsm8k(path=str(shared_data / "gsm8k" / "test.jsonl"))
    assert len(gsm) == 1319 and not report.skipped
    mmlu, _ = load_mmlu(path=str(shared_data / "mmlu" / "test.jsonl"), limit=500)
    assert len(mmlu) == 500 and all(e.answer in "ABCD" for e in mmlu)


def test_mmlu_offline_names_the_setting_that_gives_it_and_that_advice_works(monkeypatch, tmp_path):
    from pocket_teacher.experiment import configure, load_data
    from pocket_teacher.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(HubUnavailableError, match=r"Set eval\.mmlu_source to a local JSONL .* or "
                                                  r"eval\.mmlu_source=null to skip MMLU") as error:
        load_data(configure("tiny", ["eval.mmlu_source=hub"]), verbose=False)
    assert "data.train_path" not in str(error.value)
    assert load_data(configure("tiny", ["eval.mmlu_source=null"]), verbose=False).mmlu is None


def test_an_mmlu_sample_is_stratified_by_subject_and_seeded(tmp_path):
    """MMLU files are sorted by subject (the first 500 test rows are all moral_scenarios): a sample of N spreads over
    the subjects in proportion to their rows, one at least each, chosen by the seed, in file order, and says so."""
    sizes = {"anatomy": 30, "astronomy": 10, "moral_scenarios": 55, "virology": 5}
    rows = [{"question": f"{s} question {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4, "subject": s}
            for s, n in sizes.items() for i in range(n)]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample, report = load_mmlu(path=str(path), limit=20)
    counts = {s: sum(e.subject == s for e in sample) for s in sizes}
    assert counts == {"anatomy": 6, "astronomy": 2, "moral_scenarios": 11, "virology": 1}
    assert [e.where for e in sample] == sorted((e.where for e in sample), key=lambda w: int(w.split(":")[1]))
    assert "20 of them scored: a sample stratified by subject (4 subjects" in str(report) and "seed 0" in str(report)
    assert report.rows == 100 and report.kept == 100
    assert [e.where for e in load_mmlu(path=str(path), limit=20)[0]] == [e.where for e in sample]
    other = load_mmlu(path=str(path), limit=20, seed=1)[0]
    assert [e.where for e in other] != [e.where for e in sample]
    assert {s: sum(e.subject == s for e in other) for s in sizes} == counts
    tiny = load_mmlu(path=str(path), limit=3)[0]  # fewer than the subjects: largest remainders of 0.9 / 0.3 / 1.65
    assert sorted(e.subject for e in tiny) == ["anatomy", "moral_scenarios", "moral_scenarios"]
    assert len(load_mmlu(path=str(path), limit=99)[0]) == 99 and len(load_mmlu(path=str(path))[0]) == 100
