"""pocket_teacher.students: layer importance, students from a config (random or pruned), and their wiring."""

import pytest
import torch

from pocket_teacher.students import (activation_importance, block_influence, calibration_batches, config_student,
                                     select_layers)


@pytest.fixture()
def batches(tiny_tokenizer):
    texts = [f"Question: what is {i} plus {i}?\nAnswer: {i} + {i} = {2 * i}\n#### {2 * i}" for i in range(12)]
    return calibration_batches(tiny_tokenizer, texts, batch_size=5)


def test_block_influence_is_one_minus_the_cosine_of_each_layer(tiny_teacher, batches):
    scores = block_influence(tiny_teacher, batches)
    assert len(scores) == tiny_teacher.config.num_hidden_layers
    # by hand for the first layer, through output_hidden_states (layer 0's output is hidden_states[1])
    total, count = 0.0, 0
    for b in batches:
        hs = tiny_teacher(**b, output_hidden_states=True).hidden_states
        cos = torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1)[b["attention_mask"].bool()]
        total, count = total + float(cos.sum()), count + cos.numel()
    assert scores[0] == pytest.approx(1 - total / count, abs=1e-5)
    assert select_layers([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]


def test_pruning_keeps_the_teachers_weights_for_what_it_keeps(tiny_teacher, batches):
    t = tiny_teacher.config
    shape = {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    student = config_student(tiny_teacher, shape, "prune", batches)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (2, 48, 2, 1, 64)
    imp = activation_importance(tiny_teacher, batches)
    hc = torch.sort(torch.topk(imp["embedding"], 48).indices).values
    torch.testing.assert_close(student.get_input_embeddings().weight, tiny_teacher.get_input_embeddings().weight[:, hc])
    layer = c.pruned_from_layers[0]
    mc = torch.sort(torch.topk(imp["mlp"][layer], 64).indices).values
    t_mlp, s_mlp = tiny_teacher.model.layers[layer].mlp, student.model.layers[0].mlp
    torch.testing.assert_close(s_mlp.down_proj.weight, t_mlp.down_proj.weight[hc][:, mc])
    torch.testing.assert_close(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight[mc][:, hc])
    head_dim = t.hidden_size // t.num_attention_heads
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (2 * head_dim, 48)
    out = student(**batches[0])  # a working model
    assert torch.isfinite(out.logits).all()


def test_random_init_has_the_shape_and_fresh_weights(tiny_teacher):
    student = config_student(tiny_teacher, {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2,
                                            "intermediate_size": 40}, "random")
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1
    again = config_student(tiny_teacher, {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2,
                                          "intermediate_size": 40}, "random")
    torch.testing.assert_close(student.lm_head.weight, again.lm_head.weight)  # seeded


@pytest.mark.parametrize("overrides", [
    ["student.source=config", "student.init=prune", "student.num_layers=2", "student.hidden_size=48"],
    ["student.source=config", "student.init=random", "student.num_layers=2", "student.intermediate_size=64"],
    ["student.layer_selection=importance"],
])
def test_the_pipeline_builds_and_trains_each_kind_of_student(tmp_path, overrides):
    from pocket_teacher.experiment import Experiment, configure

    cfg = configure("tiny", [f"run.out_dir={tmp_path}", "train.max_steps=2", "eval.generate_samples=0",
                             "eval.efficiency=false", "eval.baseline=false", "eval.on_policy_preview=0", *overrides])
    exp = Experiment(cfg, progress=False)
    exp.run()
    rows = exp.results
    assert rows["student after"]["perplexity"] < float("inf") and len(exp.trained.result.history) == 2
    if "student.source=config" in overrides:
        assert exp.student_init.config.num_hidden_layers == 2


def test_a_config_student_with_inconsistent_heads_is_refused():
    from pocket_teacher.config import ConfigError, apply_overrides, get_preset

    with pytest.raises(ConfigError, match="student.num_kv_heads=3 is invalid"):
        apply_overrides(get_preset("tiny"), ["student.source=config", "student.num_heads=4", "student.num_kv_heads=3"])


@pytest.mark.parametrize("shape, field", [
    ({"num_layers": 5}, "student.num_layers gives 5 layers"),
    ({"hidden_size": 96, "num_heads": 4, "num_kv_heads": 2}, "student.hidden_size gives 96"),
    ({"intermediate_size": 256}, "student.intermediate_size gives 256"),
    ({"num_heads": 4, "num_kv_heads": 4}, "student.num_kv_heads gives 4 key/value heads, more than the teacher's 2"),
    ({"num_heads": 3, "num_kv_heads": 1}, "student.num_heads / num_kv_heads gives 3 query heads per key/value head"),
])
def test_a_pruned_student_larger_than_its_teacher_anywhere_is_refused_by_name(tiny_teacher, batches, shape, field):
    from pocket_teacher.models import ModelLoadError

    base = {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    with pytest.raises(ModelLoadError, match="init=prune: " + field):
        config_student(tiny_teacher, {**base, **shape}, "prune", batches)
    config_student(tiny_teacher, {**base, **shape}, "random")  # the same shape is fine from random init


def test_pruning_a_quantized_teacher_names_the_fix_and_a_dense_teacher_prunes(tiny_teacher, batches):
    import copy

    from pocket_teacher.models import ModelLoadError

    shape = {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    quantized = copy.deepcopy(tiny_teacher)
    quantized.is_loaded_in_4bit = True  # as bitsandbytes marks a model it loaded in 4 bits
    with pytest.raises(ModelLoadError, match="needs the teacher's dense weights; load the teacher in bf16/fp32"):
        config_student(quantized, shape, "prune", batches)
    assert config_student(tiny_teacher, shape, "prune", batches).config.hidden_size == 48  # the advice, followed

