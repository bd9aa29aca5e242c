"""pocket_teacher.teacher_cache: fingerprints, reuse, torn writes, fidelity, the teacher's answers."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocket_teacher.config import ConfigError, GenerateConfig, apply_overrides, get_preset
from pocket_teacher.data import Example, load_gsm_symbolic, tokenize_examples
from pocket_teacher.models import ModelLoadError, derive_student, load_teacher, resolve_precision
from pocket_teacher.generate import generate_answers
from pocket_teacher.teacher_cache import (build_topk_cache, built_share, fingerprint, fingerprint_parts,
                                          validate_cache)
from pocket_teacher.train import HeldOut, Vocab, distill


@pytest.fixture(scope="module")
def examples():
    return load_gsm_symbolic(10, seed=5)[0]


@pytest.fixture()
def split(examples, tiny_tokenizer):
    return tokenize_examples(examples, tiny_tokenizer, max_length=384)


class ForwardCounter:
    """Counts forward passes of a model's decoder (what building a cache costs)."""

    def __init__(self, model):
        self.calls = 0
        model.get_decoder().register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _build(teacher, split, root, **kw):
    kw.setdefault("k", 16)
    return build_topk_cache(teacher, split, root, batch_size=4, progress=False, **kw)


def test_second_call_reuses_the_cache_without_a_teacher_forward(tiny_teacher, split, tmp_path):
    counter = ForwardCounter(tiny_teacher)
    first = _build(tiny_teacher, split, tmp_path)
    assert first.report.status == "built" and counter.calls == 3  # 10 rows in batches of 4
    second = _build(tiny_teacher, split, tmp_path)
    assert second.report.status == "reused" and counter.calls == 3
    assert second.path == first.path and second.report.tokens == split.answer_tokens
    rows = second.rows([0, 3])
    assert rows.ids.shape == rows.logprobs.shape
    assert rows.ids.shape[1] == 16 and rows.tail.shape[0] == rows.ids.shape[0]


def test_a_cache_from_kept_hidden_states_runs_no_teacher_decoder_and_matches_a_live_build(tiny_teacher, split,
                                                                                          tmp_path, tiny_tokenizer):
    """build_topk_cache(AnswerHidden): the teacher's logits rebuilt from hidden states an earlier pass over the same
    split kept (evaluate.agreements) with its output layer alone: the same top-k as a build that runs the teacher."""
    import numpy as np

    from pocket_teacher.evaluate import agreements

    vocab = len(tiny_tokenizer)
    kept = agreements(tiny_teacher, {}, split, pad_token_id=tiny_tokenizer.pad_token_id, vocab_size=vocab,
                      batch_size=3, progress=False, keep_teacher=True).teacher_hidden
    counter = ForwardCounter(tiny_teacher)
    from_kept = _build(tiny_teacher, kept, tmp_path / "kept", vocab_size=vocab)
    assert counter.calls == 0 and from_kept.report.status == "built"
    live = _build(tiny_teacher, split, tmp_path / "live", vocab_size=vocab)
    assert counter.calls == 3 and live.path.name == from_kept.path.name  # the same fingerprint
    a, b = from_kept.rows(range(len(split))), live.rows(range(len(split)))
    # the same values up to float rounding (other batch shapes): near-ties may swap neighbouring ids, so each
    # token's k log-probs are compared sorted, and its ids as sets
    assert np.allclose(np.sort(a.logprobs.numpy(), -1), np.sort(b.logprobs.numpy(), -1), atol=2e-3)
    same = [set(x) == set(y) for x, y in zip(a.ids.tolist(), b.ids.tolist())]
    assert sum(same) >= 0.98 * len(same)
    assert np.allclose(a.tail.numpy(), b.tail.numpy(), atol=1e-5)
    other = derive_student(tiny_teacher, num_layers=1)
    with pytest.raises(ValueError, match="another teacher"):
        _build(other, kept, tmp_path / "other", vocab_size=vocab)


def test_any_change_gives_a_new_fingerprint(tiny_teacher, split, examples, tiny_tokenizer):
    base = fingerprint(fingerprint_parts(tiny_teacher, split, 16, len(tiny_tokenizer)))
    other_teacher = derive_student(tiny_teacher, num_layers=1)
    changed = {
        "teacher": fingerprint(fingerprint_parts(other_teacher, split, 16, len(tiny_tokenizer))),
        "precision": fingerprint(fingerprint_parts(tiny_teacher, split, 16, len(tiny_tokenizer),
                                                   {"precision": "bf16"})),
        "data": fingerprint(fingerprint_parts(tiny_teacher, tokenize_examples(examples[:-1], tiny_tokenizer, 384),
                                              16, len(tiny_tokenizer))),
        "max_length": fingerprint(fingerprint_parts(tiny_teacher, tokenize_examples(examples, tiny_tokenizer, 383),
                                                    16, len(tiny_tokenizer))),
        "template": fingerprint(fingerprint_parts(
            tiny_teacher, tokenize_examples(examples, tiny_tokenizer, 384, system_prompt="Be brief."), 16,
            len(tiny_tokenizer))),
        "k": fingerprint(fingerprint_parts(tiny_teacher, split, 8, len(tiny_tokenizer))),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)
    # A single slightly changed weight is enough.
    with torch.no_grad():
        tiny_teacher.get_output_embeddings().weight[5, 7] += 1e-3  # not in the strided sample
    assert fingerprint(fingerprint_parts(tiny_teacher, split, 16, len(tiny_tokenizer))) != base


def _killed_at_the_second_batch(teacher, split, root):
    """A build (batches of 4) killed as its second batch starts: the first batch is on disk, nothing published."""
    calls = {"n": 0}

    def die_on_second_batch(*_):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")

    handle = teacher.get_decoder().register_forward_pre_hook(die_on_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            _build(teacher, split, root)
    finally:
        handle.remove()


def test_a_build_killed_midway_resumes_and_equals_a_clean_build(tiny_teacher, split, tmp_path):
    _killed_at_the_second_batch(tiny_teacher, split, tmp_path / "a")
    partial = [p for p in (tmp_path / "a").iterdir() if p.suffix != ".lock"]  # the build lock may stay
    assert len(partial) == 1 and partial[0].name.endswith(".partial")  # nothing readable was published
    assert validate_cache(partial[0]) is not None
    # the time plan, before the build resumes, sees the rows already built (4 of 10) and where
    vocab = tiny_teacher.get_output_embeddings().weight.shape[0]
    assert built_share(tiny_teacher, split, tmp_path / "a", 16, vocab, 4) == (0.4, partial[0])
    assert built_share(tiny_teacher, split, tmp_path / "b", 16, vocab, 4) == (0.0, tmp_path / "b" / partial[0].stem)
    # resumed in batches of another size, no recorded batch is reused: neither the plan nor the report counts it
    assert built_share(tiny_teacher, split, tmp_path / "a", 16, vocab, 3) == (0.0, tmp_path / "a" / partial[0].stem)
    counter = ForwardCounter(tiny_teacher)
    resumed = _build(tiny_teacher, split, tmp_path / "a")
    assert built_share(tiny_teacher, split, tmp_path / "a", 16, vocab, 4) == (1.0, resumed.path)
    assert resumed.report.status == "resumed after 4 of 10 rows" and counter.calls == 2
    clean = _build(tiny_teacher, split, tmp_path / "b")
    for name in ("ids", "logprobs", "tail"):
        torch.testing.assert_close(getattr(resumed.rows(range(10)), name), getattr(clean.rows(range(10)), name))
    assert resumed.report.kl_sample == pytest.approx(clean.report.kl_sample, rel=1e-6)


def test_a_truncated_or_altered_cache_is_never_read(tiny_teacher, split, tmp_path):
    cache = _build(tiny_teacher, split, tmp_path)
    good = cache.rows(range(10))
    ids_file = cache.path / "ids.bin"
    data = ids_file.read_bytes()
    ids_file.write_bytes(data[: len(data) // 2])  # torn write
    assert "bytes" in validate_cache(cache.path)
    counter = ForwardCounter(tiny_teacher)
    rebuilt = _build(tiny_teacher, split, tmp_path)
    assert rebuilt.report.status == "built" and counter.calls == 3
    torch.testing.assert_close(rebuilt.rows(range(10)).ids, good.ids)
    # Same size, one flipped byte: caught by the checksum.
    raw = bytearray((rebuilt.path / "logprobs.bin").read_bytes())
    raw[5] ^= 0xFF
    (rebuilt.path / "logprobs.bin").write_bytes(bytes(raw))
    assert "checksum" in validate_cache(rebuilt.path)


def test_fidelity_report(tiny_teacher, split, tmp_path, tiny_tokenizer):
    small = _build(tiny_teacher, split, tmp_path, k=4)
    full = _build(tiny_teacher, split, tmp_path, k=len(tiny_tokenizer))
    assert 0.0 < small.report.mass_mean < 1.0 and small.report.kl_sample > 0
    assert full.report.mass_mean == pytest.approx(1.0, abs=1e-5) and full.report.kl_sample < 1e-3
    assert small.report.bytes == pytest.approx(small.report.tokens * (4 * 6 + 4), abs=4096)
    assert "fidelity: top-4 mass" in str(small.report)
    with pytest.raises(ValueError, match="cache.k"):
        _build(tiny_teacher, split, tmp_path, k=0)


def test_training_from_a_full_vocabulary_cache_equals_the_live_teacher(tiny_teacher, split, tmp_path,
                                                                       tiny_tokenizer):
    """k = V: the cache holds the whole distribution, so the loss curve equals the live teacher's."""
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 3, "train.warmup_steps": 0})
    cache = _build(tiny_teacher, split, tmp_path, k=len(tiny_tokenizer), vocab_size=len(tiny_tokenizer))
    runs = {}
    for name, kwargs in (("live", {}), ("cache", {"teacher_cache": cache})):
        student = derive_student(tiny_teacher, num_layers=2)
        counter = ForwardCounter(tiny_teacher)
        runs[name] = distill(student, tiny_teacher if name == "live" else None, split, cfg,
                             Vocab(tiny_tokenizer.pad_token_id, len(tiny_tokenizer)), progress=False, **kwargs)
        if name == "cache":
            assert counter.calls == 0
    for a, b in zip(runs["live"].history, runs["cache"].history):
        for key in ("loss", "ce", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("implementation", ["full", "chunked"])
def test_cache_training_with_held_out_evaluation(tiny_teacher, split, examples, tiny_tokenizer, tmp_path,
                                                 implementation):
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 2, "train.eval_every": 1,
                                               "loss.implementation": implementation})
    held_out = tokenize_examples(examples[:3], tiny_tokenizer, 384)
    cache = _build(tiny_teacher, split, tmp_path / "train")
    eval_cache = _build(tiny_teacher, held_out, tmp_path / "eval")
    result = distill(derive_student(tiny_teacher, num_layers=2), None, split, cfg,
                     tiny_tokenizer.pad_token_id, teacher_cache=cache, held_out=HeldOut(held_out, eval_cache),
                     progress=False)
    assert all(h["eval_ppl"] > 1 and h["eval_kd"] >= 0 for h in result.history)


def test_cache_of_another_split_is_refused(tiny_teacher, split, examples, tiny_tokenizer, tmp_path):
    cache = _build(tiny_teacher, split, tmp_path)
    other = tokenize_examples(examples[:5], tiny_tokenizer, 384)
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 1})
    with pytest.raises(ValueError, match="another split"):
        distill(derive_student(tiny_teacher, num_layers=2), None, other, cfg, 0, teacher_cache=cache,
                progress=False)


# -- the teacher's generated answers ------------------------------------------------------------------------

def _questions():
    return [Example(question=f"What is {i} + {i}?", target=f"{i} + {i} = {2 * i}\n#### {2 * i}", answer=str(2 * i),
                    where=f"q#{i}") for i in range(4)]


def test_generated_answers_filter_by_correctness_and_are_cached(monkeypatch, tiny_teacher, tiny_tokenizer,
                                                                  tmp_path):
    canned = ["0 + 0 = 0\n#### 0", "1 + 1 = 3\n#### 3", "", "3 + 3 = 6. The answer is 6"]
    calls = []

    def fake_generate(model, tokenizer, prompts, settings=None, **kwargs):
        calls.append(len(prompts))
        return canned[:len(prompts)]

    monkeypatch.setattr("pocket_teacher.generate.generate", fake_generate)
    kept, report = generate_answers(tiny_teacher, tiny_tokenizer, _questions(), tmp_path, GenerateConfig(),
                                    keep="correct", progress=False)
    assert [e.answer for e in kept] == ["0", "6"] and kept[0].target == canned[0]
    assert report.rejected == {"wrong final number": 1, "empty answer": 1} and report.status == "generated"
    rows = [json.loads(line) for line in open(report.path)]
    assert [r["extracted"] for r in rows] == ["0", "3", None, "6"] and rows[1]["gold"] == "2"
    everything, report2 = generate_answers(tiny_teacher, tiny_tokenizer, _questions(), tmp_path, GenerateConfig(),
                                           keep="all", progress=False)
    assert len(everything) == 3 and report2.status == "reused" and calls == [4]  # reused: no second generation
    with pytest.raises(ValueError, match="keep="):
        generate_answers(tiny_teacher, tiny_tokenizer, _questions(), tmp_path, GenerateConfig(), keep="best",
                         progress=False)


def test_fine_tuning_without_a_teacher_needs_alpha_one(tiny_teacher, split, tiny_tokenizer):
    cfg = apply_overrides(get_preset("tiny"), {"train.max_steps": 2})
    student = derive_student(tiny_teacher, num_layers=2)
    with pytest.raises(ValueError, match="loss.alpha=1"):
        distill(student, None, split, cfg, tiny_tokenizer.pad_token_id, progress=False)
    cfg = apply_overrides(cfg, {"loss.alpha": 1.0})
    result = distill(student, None, split, cfg, tiny_tokenizer.pad_token_id, progress=False)
    assert all(math.isfinite(h["ce"]) and h["kd"] is None for h in result.history)


# -- quantized teachers: clear refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_quantized_teacher_on_cpu_is_refused_with_the_fallback(precision):
    with pytest.raises(ModelLoadError, match=rf"teacher.precision={precision} needs a CUDA GPU.*fp32"):
        resolve_precision(precision, torch.device("cpu"))


def test_unknown_precision_is_refused(tiny_cfg):
    with pytest.raises(ModelLoadError, match="unknown"):
        resolve_precision("int3", torch.device("cpu"))
    with pytest.raises(ConfigError, match="teacher.precision"):
        apply_overrides(get_preset("tiny"), {"teacher.precision": "int3"})


def test_teacher_info_reports_precision_choice_and_memory(tiny_cfg):
    teacher, _, info = load_teacher(tiny_cfg.teacher, "cpu")
    assert info.precision == "fp32 (auto: CPU, where fp32 is fastest)"
    expected = sum(p.numel() * 4 for p in teacher.parameters())
    assert expected <= info.memory_bytes < expected * 1.1 and "MiB in memory" in str(info)
    _, _, info16 = load_teacher(tiny_cfg.teacher, "cpu", precision="bf16")
    assert info16.precision == "bf16" and info16.memory_bytes < 0.6 * info.memory_bytes


def test_the_fidelity_line_compares_the_two_objectives_at_the_training_temperature(tiny_teacher, split, tmp_path,
                                                                                    tiny_tokenizer):
    """The cached target at T is what the loss builds (topk_buckets), the live one the full distribution tempered:
    at T = 1 they agree on the buckets (fp16 rounding aside), at T = 2 full tempering gives the tail more mass, and
    the KL measured is the one between the two targets, recomputed here from the teacher's logits."""
    import torch.nn.functional as F

    from pocket_teacher.batches import answer_batch, answer_logits
    from pocket_teacher.losses import TeacherTopK, kl, topk_buckets
    from pocket_teacher.teacher_cache import Fidelity, build_topk_cache

    cache = build_topk_cache(tiny_teacher, split, tmp_path, k=8, vocab_size=len(tiny_tokenizer), progress=False,
                             fidelity=Fidelity(len(split), 2.0))
    at = cache.report.at_temperature
    assert set(at) == {"1", "1.5", "2", "3", "4"}
    assert at["1"]["kl"] < 1e-4 and at["1"]["tail_live"] == pytest.approx(at["1"]["tail_cached"], abs=1e-3)
    assert at["2"]["tail_live"] > at["2"]["tail_cached"] and at["2"]["kl"] > at["1"]["kl"] + 1e-3
    assert at["4"]["kl"] > at["2"]["kl"]
    batch = answer_batch(split, range(len(split)), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        log_p = F.log_softmax(answer_logits(tiny_teacher, batch.input_ids, batch.attention_mask, batch.select), -1)
    signal = cache.rows(range(len(split)))
    cached, _ = topk_buckets(torch.zeros_like(log_p), TeacherTopK(signal.ids, signal.logprobs, signal.tail),
                             temperature=2.0)
    live = F.log_softmax(log_p / 2.0, -1)
    rest = torch.logsumexp(live.scatter(-1, signal.ids, float("-inf")), -1, keepdim=True)
    expected = kl(torch.cat([live.gather(-1, signal.ids), rest], -1), cached).mean()
    assert at["2"]["kl"] == pytest.approx(float(expected), rel=1e-3)
    assert at["2"]["tail_cached"] == pytest.approx(float(cached[:, -1].exp().mean()), rel=1e-3)
    line = str(cache.report)
    assert "at the training temperature T=2 the two objectives differ" in line and "KL(live || cached target)" in line
    again = build_topk_cache(tiny_teacher, split, tmp_path, k=8, vocab_size=len(tiny_tokenizer), progress=False,
                             fidelity=Fidelity(len(split), 2.5))
    assert again.report.status == "reused" and "T=2.5: not measured (when this cache was built: T = 1, 1.5, 2, 3, 4)" \
        in str(again.report)


# -- several processes build one cache ------------------------------------------------------------------------

CACHE_JOB = Path(__file__).with_name("_cache_job.py")
CACHE_FILES = ("ids.bin", "logprobs.bin", "tail.bin", "offsets.npy")


def _run_cache_job(root: Path, processes: int) -> list[str]:
    """tests/_cache_job.py in `processes` processes (torchrun, gloo), one thread each: its cache folder and status."""
    cmd = [sys.executable, str(CACHE_JOB), str(root)]
    if processes > 1:
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-2:]


@pytest.mark.slow
def test_two_gloo_processes_build_the_same_bytes_as_one(tmp_path):
    one_path, one_status = _run_cache_job(tmp_path / "one", 1)
    two_path, two_status = _run_cache_job(tmp_path / "two", 2)
    assert one_status == "built" and two_status == "built by 2 processes"
    assert Path(one_path).name == Path(two_path).name  # the same fingerprint: the same teacher, data and settings
    for name in CACHE_FILES:
        assert (Path(one_path) / name).read_bytes() == (Path(two_path) / name).read_bytes(), name
    one, two = (json.loads((Path(p) / "meta.json").read_text()) for p in (one_path, two_path))
    assert one["checksums"] == two["checksums"]
    for key in ("kl_sample", "kl_sample_tokens", "at_temperature", "mass_mean", "mass_p05", "tokens", "bytes"):
        assert one["report"][key] == two["report"][key], key  # fidelity sums in batch order: equal, not close
    assert not list(Path(two_path).parent.glob("*.partial"))


def test_shares_cut_the_batches_in_order_by_their_cost():
    from pocket_teacher.teacher_cache import shares

    groups = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert shares(groups, [1, 1, 1, 1, 1], 1) == [groups]
    two = shares(groups, [10, 1, 1, 1, 7], 2)
    assert two == [[(0, 2)], [(2, 4), (4, 6), (6, 8), (8, 9)]]  # the costly first batch alone
    three = shares(groups, [1, 1, 1, 1, 1], 3)
    assert [g for part in three for g in part] == groups and all(three)
    assert shares([], [], 2) == [[], []]


def test_a_share_left_by_a_stopped_group_is_joined_by_one_process(tiny_teacher, split, tmp_path):
    """Process 0 of 2 computes its share, then the group stops (its partner died): one process alone resumes,
    computes only the other share, and the cache equals a one-process build byte for byte."""
    from pocket_teacher.teacher_cache import Share

    waits = {"n": 0}

    def partner_died():
        waits["n"] += 1
        if waits["n"] == 2:  # the barrier after the shares
            raise KeyboardInterrupt("the other process was killed")

    counter = ForwardCounter(tiny_teacher)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_teacher, split, tmp_path / "a", share=Share(0, 2, partner_died))
    first_share = counter.calls
    assert 0 < first_share < 3  # 10 rows in batches of 4: process 0 had part of them
    resumed = _build(tiny_teacher, split, tmp_path / "a")
    assert counter.calls == 3  # the missing batches only
    assert resumed.report.status.startswith("resumed after") and "of 10 rows" in resumed.report.status
    clean = _build(tiny_teacher, split, tmp_path / "b")
    for name in CACHE_FILES:
        assert (resumed.path / name).read_bytes() == (clean.path / name).read_bytes(), name
    assert resumed.report.kl_sample == clean.report.kl_sample
    assert resumed.report.at_temperature == clean.report.at_temperature


def test_batches_missing_after_a_build_are_named_and_running_again_computes_them(tiny_teacher, split, tmp_path,
                                                                                  monkeypatch):
    """A build whose processes left batches uncomputed (a share lost) publishes nothing and says to run again;
    run again, it computes only those and equals a clean build."""
    from pocket_teacher import teacher_cache as tc

    real = tc.shares
    monkeypatch.setattr(tc, "shares", lambda groups, cost, size: [real(groups, cost, size)[0][:-1]])  # one lost
    with pytest.raises(tc.CacheError, match="batches of .* are missing after the build .* run again to compute them"):
        _build(tiny_teacher, split, tmp_path / "a")
    monkeypatch.setattr(tc, "shares", real)
    counter = ForwardCounter(tiny_teacher)
    again = _build(tiny_teacher, split, tmp_path / "a")  # the advice, followed
    assert again.report.status.startswith("resumed after") and counter.calls == 1
    clean = _build(tiny_teacher, split, tmp_path / "b")
    for name in ("ids", "logprobs", "tail"):
        torch.testing.assert_close(getattr(again.rows(range(10)), name), getattr(clean.rows(range(10)), name))


def test_a_build_resumed_in_batches_of_another_size_says_it_kept_nothing(tiny_teacher, split, tmp_path):
    """A partial build's batches are reused only when the resume cuts the same batches (e.g. not after lowering
    teacher_cache.batch_size): the report and the time plan count only what is kept."""
    _killed_at_the_second_batch(tiny_teacher, split, tmp_path)
    vocab = tiny_teacher.get_output_embeddings().weight.shape[0]
    assert built_share(tiny_teacher, split, tmp_path, 16, vocab, 3)[0] == 0.0
    counter = ForwardCounter(tiny_teacher)
    resumed = build_topk_cache(tiny_teacher, split, tmp_path, k=16, batch_size=3, progress=False)
    assert resumed.report.status == "resumed after 0 of 10 rows" and counter.calls == 4
