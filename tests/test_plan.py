"""pocket_teacher.plan and the `plan` command: shapes, byte counts, verdicts, exit codes and the knobs it names."""

import pytest
import torch

from pocket_teacher.cli import main
from pocket_teacher.timeplan import checkpoint_every, time_plan
from pocket_teacher.config import apply_overrides, get_preset
from pocket_teacher.plan import (EXPORT_ALONE, GGUF_STRING_BYTES, HEAL_ALONE, KNOWN_MODELS, PlanError,
                                 memory_plan, model_shape, optimizer_bytes, shape_from_config, train_activation_bytes,
                                 weight_bytes)


def _qwen2_tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("make", ["llama", "qwen2"])
def test_parameter_count_matches_a_real_model(make, tiny_cfg):
    from pocket_teacher.models import build_tiny_model

    model = build_tiny_model(tiny_cfg.teacher.tiny, tiny_cfg.teacher.tiny.vocab_size) if make == "llama" \
        else _qwen2_tiny()
    shape = (model_shape("tiny", tiny=tiny_cfg.teacher.tiny) if make == "llama"
             else shape_from_config(model.config.to_dict(), "qwen2-tiny"))
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert weight_bytes(shape, "fp32") == 4 * shape.params


def test_known_shapes_give_the_published_sizes():
    sizes = {"Qwen/Qwen2.5-0.5B-Instruct": 494.0e6, "Qwen/Qwen2.5-1.5B-Instruct": 1.544e9,
             "Qwen/Qwen2.5-7B-Instruct": 7.616e9, "embedded": 134.5e6}
    for name, size in sizes.items():
        assert KNOWN_MODELS[name].params == pytest.approx(size, rel=2e-3), name


def test_8bit_weights_near_half_of_bf16_and_optimizer_sizes():
    qwen7 = KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]
    eight, half = weight_bytes(qwen7, "8bit"), weight_bytes(qwen7, "bf16")
    assert 8.0 * 2**30 < eight < 8.3 * 2**30  # int8 decoder linears, 16-bit embeddings and output layer
    assert 0.5 < eight / half < 0.6
    small = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]
    assert optimizer_bytes(small, "adamw") == 8 * small.params
    assert optimizer_bytes(small, "adamw_8bit") < 0.27 * optimizer_bytes(small, "adamw")


def test_checkpointing_cuts_activations_by_more_than_the_layer_count():
    shape = KNOWN_MODELS["Qwen/Qwen2.5-1.5B-Instruct"]
    full = train_activation_bytes(shape, 2, 4096, 512, checkpointing=False, flash=True)
    ckpt = train_activation_bytes(shape, 2, 4096, 512, checkpointing=True, flash=True)
    assert ckpt < full / 5


def test_model_shape_from_a_local_folder_and_unknown_ids(tmp_path):
    model = _qwen2_tiny()
    model.config.save_pretrained(tmp_path)
    assert model_shape(str(tmp_path)).params == sum(p.numel() for p in model.parameters())
    with pytest.raises(PlanError, match="No shape known for 'someone/unknown-model'.*config.json"):
        model_shape("someone/unknown-model")


@pytest.mark.parametrize("preset,gpu,code", [("t4", "t4", 0), ("a100", "a100-40", 0), ("a100", "t4", 3)])
def test_plan_command_exit_codes(preset, gpu, code, capsys):
    assert main(["plan", "--preset", preset, "--gpu", gpu]) == code
    out = capsys.readouterr().out
    for stage in ("teacher cache", "evaluation", "generation", "training"):
        assert stage in out
    assert ("FITS" if code == 0 else "DOES NOT FIT") in out


def test_a_plan_that_does_not_fit_names_knobs_that_make_it_fit():
    cfg = apply_overrides(get_preset("t4"), ["train.gradient_checkpointing=false", "train.optimizer=adamw"])
    plan = memory_plan(cfg, "t4")
    assert not plan.fits and plan.fixes
    fixed = memory_plan(apply_overrides(cfg, [f for f in plan.fixes if "=" in f]), "t4")
    assert fixed.fits
    impossible = memory_plan(get_preset("a100"), "t4")
    assert not impossible.fits and "smaller student" in impossible.fixes[-1]


def test_the_plan_follows_precision_and_the_device():
    t4 = memory_plan(get_preset("t4"), "t4")
    a100 = memory_plan(get_preset("t4"), "a100-40")
    assert t4.settings["mixed_precision"] == "fp16" and a100.settings["mixed_precision"] == "bf16"
    assert t4.settings["chunk"] >= 1024
    training = next(s for s in t4.stages if s.name == "training")
    assert "teacher weights" not in training.device  # the cache is read, so the teacher waits on the host
    assert "teacher (offloaded to host)" in training.host
    live = memory_plan(apply_overrides(get_preset("t4"), ["teacher_cache.use=false"]), "t4")
    assert "teacher weights" in next(s for s in live.stages if s.name == "training").device


def test_real_lengths_shrink_the_worst_case():
    cfg = get_preset("pocket")
    worst = memory_plan(cfg, "cpu")
    real = memory_plan(cfg, "cpu", lengths=[100] * 10, eval_lengths=[120] * 10, prompt_lengths=[60] * 10)
    peak = {s.name: s.host_peak for s in worst.stages}
    assert all(s.host_peak < peak[s.name] for s in real.stages)


def test_checkpoint_cadence_of_the_colab_presets_loses_under_ten_minutes():
    for preset, gpu in (("t4", "t4"), ("a100", "a100-40")):
        cfg = get_preset(preset)
        plan = time_plan(cfg, gpu)
        assert 0 < cfg.train.checkpoint_every <= checkpoint_every(plan.step_seconds, 10.0), preset


def test_run_refuses_a_plan_that_does_not_fit_before_loading(monkeypatch, tmp_path, capsys):
    import pocket_teacher.experiment as experiment

    def boom(*a, **k):
        raise AssertionError("nothing may load when the plan does not fit")

    monkeypatch.setattr(experiment, "load_data", boom)
    tiny = get_preset("tiny").teacher.tiny
    huge = ["teacher.tiny.hidden_size=8192", "teacher.tiny.intermediate_size=32768", "teacher.tiny.num_layers=64",
            "teacher.tiny.num_heads=64", "teacher.tiny.num_kv_heads=8", f"teacher.tiny.vocab_size={tiny.vocab_size}"]
    command = ["run", "--preset", "tiny", "--out", str(tmp_path / "r"), *[x for h in huge for x in ("--set", h)]]
    assert main(command) == 3
    err = capsys.readouterr().err
    assert "DOES NOT FIT" in err and "Or force the run (CLI --force" in err
    with pytest.raises(AssertionError, match="nothing may load"):  # the advice, followed: --force goes on to load
        main([*command, "--force"])


def test_the_teacher_waits_on_the_host_while_training_does_not_run_it(monkeypatch, tiny_teacher, tmp_path):
    """On a GPU, training from the cache (and the baseline) moves the teacher to the host and back; a live
    teacher stays. Checked on CPU by recording the moves the pipeline asks for."""
    import pocket_teacher.experiment as experiment
    from pocket_teacher.train import TrainResult

    moves, seen = [], {}
    monkeypatch.setattr(experiment, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(experiment, "offload", lambda model, device: moves.append((model, str(device))) or model)

    class FakeTrainer:
        def __init__(self, student, teacher, split, cfg, vocab, **kw):
            seen["teacher"], seen["moves_before"], self.student = teacher, list(moves), student

        def fit(self):
            return TrainResult(student=self.student)
    monkeypatch.setattr(experiment, "Trainer", FakeTrainer)
    cfg = apply_overrides(get_preset("tiny"), [f"run.out_dir={tmp_path}", "train.eval_every=0"])
    splits = experiment.Splits(train=[], eval=[])
    tok = type("Tok", (), {"pad_token_id": 0, "__len__": lambda self: 10})()
    cache = object()
    experiment.train_student(cfg, tiny_teacher, tiny_teacher, splits, tok, cache=cache)
    assert seen["teacher"] is None and seen["moves_before"] == [(tiny_teacher, "cpu")]
    home = str(next(tiny_teacher.parameters()).device)
    assert moves[1] == (tiny_teacher, home)  # and back where it was once training ended
    moves.clear()
    experiment.train_student(cfg, tiny_teacher, tiny_teacher, splits, tok, cache=None)  # live teacher: stays
    assert seen["teacher"] is tiny_teacher and not [m for m in moves if m[0] is tiny_teacher]
    moves.clear()
    experiment.train_student(cfg, tiny_teacher, None, splits, tok, cache=None, park=tiny_teacher)  # the baseline
    assert seen["teacher"] is None and seen["moves_before"] == [(tiny_teacher, "cpu")]


def test_evaluation_after_training_counts_both_trained_students_beside_the_teacher():
    """evaluate_after scores the distilled student and the baseline against one teacher pass: both visit the
    device together, so the plan counts them there; without the baseline or agreement there is no such stage."""
    cfg = apply_overrides(get_preset("t4"), ["eval.baseline=true"])
    plan = memory_plan(cfg, "t4")
    after = next(s for s in plan.stages if s.name == "evaluation after")
    alone = next(s for s in plan.stages if s.name == "evaluation")
    sw = alone.device["student weights"]
    assert after.device["distilled student weights"] == after.device["baseline weights"] == sw
    assert after.device["teacher weights"] == alone.device["teacher weights"]
    assert after.device_peak > alone.device_peak + sw
    for off in ("eval.baseline=false", "eval.agreement=false"):
        assert all(s.name != "evaluation after" for s in memory_plan(apply_overrides(cfg, [off]), "t4").stages)
    cpu = memory_plan(get_preset("pocket"), "cpu")
    host = next(s for s in cpu.stages if s.name == "evaluation after").host  # one memory: four models in RAM
    assert {"teacher weights", "distilled student weights", "baseline weights",
            "student (untrained, on host)"} <= set(host)


def test_healing_is_counted_but_only_asked_for_and_its_overflow_is_a_note():
    """Healing (exp.heal) is a stage of its own: a training step plus the rounded weights it keeps, while the
    distilled student and the baseline wait on the host. A run never reaches it by itself, so a healing that does
    not fit is said in a line and does not stop the run, nor steer the knobs the plan suggests."""
    cfg = apply_overrides(get_preset("t4"), ["eval.baseline=true"])
    plan = memory_plan(cfg, "t4")
    heal = next(s for s in plan.stages if s.name == "healing")
    train = next(s for s in plan.stages if s.name == "training")
    assert heal.optional and not train.optional
    assert heal.device["rounded output layer (fp32)"] == 4 * plan.student.vocab_rows * plan.student.hidden
    assert heal.device_peak > train.device_peak  # every training item, and the rounding on top
    assert heal.device["loss buffers"] == train.device["loss buffers"]  # the chunked loss still (no (N, V) logits)
    assert heal.host["distilled student (on host)"] == heal.host["baseline student (on host)"] > 0
    assert "healing copy of the student (fp32)" in heal.device  # trains on the GPU
    assert heal.host["healing copy, then the healed student (on host)"] > 0  # copied on the host, back there
    # with the baseline waiting too, a Colab host is too small for it in the notebook's process: a line that says
    # so and where to heal instead; the run itself still fits, and no knob is suggested for it
    assert heal.host_peak > plan.device.host and plan.fits and plan.problems(optional=True) and not plan.fixes
    assert "* healing: only when asked (exp.heal / export --heal-steps); does not fit: healing: " in str(plan)
    assert HEAL_ALONE in str(plan) and "--heal-steps N" in HEAL_ALONE
    alone = memory_plan(get_preset("t4"), "t4")  # the preset as it is: no baseline
    assert "* healing: only when asked (exp.heal / export --heal-steps); fits" in str(alone)
    cpu = memory_plan(get_preset("pocket"), "cpu")  # one memory: fp32 rounded copies of every matrix, kept
    heal = next(s for s in cpu.stages if s.name == "healing")
    layers = cpu.student.layers * cpu.student.layer_linear_params * 4
    assert heal.host["rounded layer matrices"] == layers
    checkpointed = memory_plan(apply_overrides(get_preset("pocket"), ["train.gradient_checkpointing=true"]), "cpu")
    assert next(s for s in checkpointed.stages if s.name == "healing").host["rounded layer matrices"] == layers // (
        cpu.student.layers)


def test_the_export_is_counted_after_the_run_a_tensor_at_a_time_and_its_overflow_is_a_note():
    """The notebook's "Ship it" (exp.export) after the run: the distilled student visits the GPU, where the teacher
    is outside training, for the equalization's calibration rows, and is written from the host a tensor at a time
    while the baseline and the rest wait there. The host counts the largest tensor being encoded, or the teacher's
    GGUF parsed for its tokenizer (an embedded or .gguf teacher only), never the whole file; on a CPU, the student
    and the teacher once. `run` does not export, so an export that does not fit is a note that stops nothing, with
    the advice to export in a process of its own when the host overflows."""
    cfg = apply_overrides(get_preset("t4"), ["eval.baseline=true"])
    plan = memory_plan(cfg, "t4")
    names = [s.name for s in plan.stages]
    assert names.index("export") == names.index("evaluation after") + 1 and names[-1] == "healing"
    ship = next(s for s in plan.stages if s.name == "export")
    student, sw = plan.student, weight_bytes(plan.student, "fp32")
    train = next(s for s in plan.stages if s.name == "training")
    assert ship.optional and ship.device["student weights (fp32)"] == sw
    tw = train.host["teacher (offloaded to host)"]  # parked while training trains, on the GPU again after it
    assert ship.device["teacher weights"] == tw and not any("teacher (" in k for k in ship.host)
    assert ship.device["weight magnitudes (two MLP matrices)"] == 2 * 4 * student.hidden * student.intermediate
    assert ship.device["calibration row (forward, fp32 output)"] > 4 * student.vocab_rows  # at least a row's output
    assert ship.host["distilled student (on host)"] == ship.host["baseline student (on host)"] == sw
    embedding = 4 * student.vocab_rows * student.hidden  # Qwen2.5-0.5B: the embedding is the largest tensor
    assert embedding // 2 < ship.host["the tensor being written"] < embedding < sw // 3  # one tensor, not the file
    assert "* export: only when asked (exp.export, the notebook's Ship it cell); fits" in str(plan)
    small = memory_plan(cfg, "t4", host_gb=ship.host_peak / 1e9 * 0.95)  # the host is what overflows
    assert small.problems(optional=True) and not any(p.startswith("export") for p in small.problems())
    line = next(x for x in str(small).splitlines() if x.startswith("  * export"))
    assert "does not fit" in line and EXPORT_ALONE in line and HEAL_ALONE not in line
    assert "python -m pocket_teacher export --run runs/NAME --quant TYPE" in EXPORT_ALONE
    cpu = memory_plan(get_preset("pocket"), "cpu")  # the embedded teacher is a GGUF file: its tokenizer is parsed
    ship = next(s for s in cpu.stages if s.name == "export")
    cpu_train = next(s for s in cpu.stages if s.name == "training")
    assert not ship.device and "student weights (fp32)" not in ship.host
    assert ship.host["teacher weights"] == cpu_train.host["teacher weights"]  # one memory: the teacher once
    parse = GGUF_STRING_BYTES * 2 * cpu.teacher.vocab
    assert ship.host["calibration, GGUF parse or one tensor (the largest)"] == parse
    hub = memory_plan(apply_overrides(get_preset("pocket"), ["teacher.source=HuggingFaceTB/SmolLM2-135M-Instruct"]),
                      "cpu")
    assert next(s for s in hub.stages if s.name == "export").host[
        "calibration, GGUF parse or one tensor (the largest)"] < parse


def test_healing_takes_no_on_policy_steps_and_a_gpu_overflow_gets_no_process_advice():
    """A run with on-policy steps has the teacher on the GPU while it trains; healing takes none, so with the cache
    the teacher waits on the host and the loss has no live teacher's buffers. Healing in a process of its own
    helps the host only: a GPU overflow does not get that advice."""
    cfg = apply_overrides(get_preset("t4"), ["train.on_policy=0.5"])
    plan = memory_plan(cfg, "t4")
    train = next(s for s in plan.stages if s.name == "training")
    heal = next(s for s in plan.stages if s.name == "healing")
    assert "teacher weights" in train.device and "teacher weights" not in heal.device
    assert heal.host["teacher (offloaded to host)"] == train.device["teacher weights"]
    assert heal.device["loss buffers"] < train.device["loss buffers"] and "rollout KV cache" not in heal.device
    assert heal.device["loss buffers"] == next(s for s in memory_plan(get_preset("t4"), "t4").stages
                                               if s.name == "healing").device["loss buffers"]
    big = memory_plan(get_preset("a100"), "t4")  # healing overflows the GPU and the host
    line = next(x for x in str(big).splitlines() if x.startswith("  * healing"))
    assert "on the GPU" in line and "host RAM" in line and HEAL_ALONE in line
    gpu_only = memory_plan(get_preset("a100"), "t4", host_gb=1000)
    line = next(x for x in str(gpu_only).splitlines() if x.startswith("  * healing"))
    assert "on the GPU" in line and HEAL_ALONE not in line


def test_a_gpu_without_a_known_host_says_to_give_host_gb_and_that_advice_checks_the_host(capsys):
    assert main(["plan", "--preset", "a100", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "host RAM: not checked: give --host-gb" in out  # the GPU's host is not known: said, not silently skipped
    need = memory_plan(get_preset("a100"), "h100").stages
    peak = max(s.host_peak for s in need if not s.optional)
    assert main(["plan", "--preset", "a100", "--gpu", "h100", "--host-gb", f"{peak / 1e9 * 0.9:.2f}"]) == 3
    out = capsys.readouterr().out
    assert "GB given" in out and "of host RAM >" in out and "DOES NOT FIT" in out
    assert main(["plan", "--preset", "a100", "--gpu", "h100", "--host-gb", "1000"]) == 0
    assert "host RAM: 931.32 GiB, 1000 GB given" in capsys.readouterr().out
