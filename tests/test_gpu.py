"""The gpu tier (`make test-gpu`): what only a CUDA device can show. Skipped where PyTorch sees no GPU."""

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_tiny_pipeline_with_an_8bit_teacher_and_16bit_training(tmp_path):
    """The whole experiment on the GPU: bitsandbytes 8-bit teacher, bf16 (sm80+) or fp16 (older) autocast,
    the teacher parked on the host while training reads its cache, the untrained student resting on the host."""
    pytest.importorskip("bitsandbytes")
    from pocket_teacher.experiment import Experiment, configure

    cfg = configure("tiny", [f"run.out_dir={tmp_path}", "run.name=gpu", "train.device=cuda",
                             "teacher.precision=8bit", "train.max_steps=4", "eval.efficiency=true"])
    exp = Experiment(cfg, progress=False)
    exp.run()
    assert any(type(m).__name__ == "Linear8bitLt" for m in exp.teacher.modules())
    assert next(exp.student_init.parameters()).device.type == "cpu"
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert exp.trained.result.mixed_precision == expected
    results = json.loads((exp.out / "results.json").read_text())["results"]
    assert all(r["perplexity"] == r["perplexity"] and r["perplexity"] < float("inf") for r in results)
    assert results[0]["peak_memory_mb_b16"] > 0
