"""The benchmarks run to their end on CPU with tiny shapes: a lent GPU's first minutes go to gpu_smoke.py and
memory_plan.py, so a call that drifted from the package (a renamed argument) must fail here, not there.
No figure is asserted: the benchmarks print them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*argv: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_gpu_smoke_runs_its_code_path_on_cpu():
    out = run_benchmark("gpu_smoke.py", "--cpu-dry-run", "--steps", "3")
    assert "hardware: CPU" in out and "s/step" in out and "tokens/s" in out


def test_train_speed_runs_on_the_tiny_preset():
    out = run_benchmark("train_speed.py", "--preset", "tiny", "--steps", "3", "--rows", "8")
    assert "tiny: 2 steps after a warm-up" in out and "steps/s" in out


@pytest.mark.slow
def test_memory_plan_measures_the_training_stage_of_tiny():
    out = run_benchmark("memory_plan.py", "--preset", "tiny", "--stage", "training")
    assert "tiny    training       plan" in out and "largest difference" in out


@pytest.mark.slow
def test_a_run_planned_with_its_own_recorded_probe_gives_its_own_plan(tmp_path):
    """tools/plan_on_probe.py (the README's plan of the demo on the other host): planned with the probe the run
    itself recorded, a finished tiny run's work sections come out as the run planned them; with a probe twice as fast
    in every rate, they come out shorter."""
    import json

    from pocket_teacher.cli import main as cli

    run = tmp_path / "tiny"
    assert cli(["run", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    out_json = tmp_path / "plan.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_on_probe.py"), "--preset", "tiny", "--run",
                           str(run), "--probe-of", str(run / "timings.json"), "--json", str(out_json)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = json.loads(out_json.read_text())["planned_s"]
    timings = json.loads((run / "timings.json").read_text())
    work = ("4b. Teacher cache", "5. Before training", "6. Distillation", "7. Evaluation after")
    for section in work:
        assert planned[section] == pytest.approx(timings["planned_s"][section], rel=1e-6), section
    assert "total" in done.stdout
    probe = dict(timings["plan"]["throughput"])
    for rate in ("flops", "bandwidth", "weight_stream", "elementwise", "sampling"):
        probe[rate] *= 2
    probe["op_seconds"] /= 2
    probe["stream_rows"] = [[rows, 2 * r] for rows, r in probe["stream_rows"]]
    (tmp_path / "fast.json").write_text(json.dumps({"throughput": probe}))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_on_probe.py"), "--preset", "tiny", "--run",
                           str(run), "--probe-of", str(tmp_path / "fast.json"), "--json", str(out_json)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    faster = json.loads(out_json.read_text())["planned_s"]
    for section in work:  # every rate twice as fast: each section about half as long (the checkpoints' disk time,
        # which the probe does not rate, and the plan's rounding to 0.01 s stay out of the halving)
        assert faster[section] <= planned[section] / 2 + 0.02, section
    assert sum(faster[s] for s in work) < sum(planned[s] for s in work)


@pytest.mark.parametrize("script", ["gguf_runtime.py", "gguf_export.py"])
def test_the_gguf_benchmarks_refuse_an_unknown_embedding_type_before_loading_anything(script, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--run", str(tmp_path / "nowhere"),
                           "--preset", "pocket", "--embedding-type", "q3_k"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "q3_k" in done.stderr and "q8_0" in done.stderr and "nowhere" not in done.stdout  # named, nothing read
