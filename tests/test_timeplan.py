"""pocket_teacher.timeplan: the work counted per section, the throughput probe and its cache, and the plan beside
the clock in timings.json. No timing is asserted: the plan's accuracy is measured by benchmarks/time_plan.py."""

import dataclasses
import json

import pytest
import torch

from pocket_teacher import timeplan
from pocket_teacher.cli import main
from pocket_teacher.config import apply_overrides, get_preset
from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
from pocket_teacher.experiment import SECTIONS
from pocket_teacher.timeplan import Lengths, Throughput, TimePlanError, compared, time_plan

FIXED = Throughput("test machine", 100e9, 10e9, 10e-6, "given")


def _plan(preset="pocket", overrides=(), **kw):
    return time_plan(apply_overrides(get_preset(preset), list(overrides)), "cpu", throughput=FIXED, **kw)


def test_every_planned_section_is_a_notebook_section_and_the_total_adds_up():
    titles = {title for _, title in SECTIONS}
    for preset in ("tiny", "pocket", "pocket-text", "tiny-text"):
        plan = _plan(preset)
        assert {s.title for s in plan.stages} <= titles, preset
        assert plan.total == pytest.approx(sum(plan.seconds().values()), abs=1.0)
        assert all(s.seconds >= 0 for s in plan.stages)
    text = {s.title for s in _plan("pocket-text").stages}
    assert "3b. Teacher answers" in text and "6c. On-policy preview" not in text  # what the preset runs


def _fidelity_seconds(preset="pocket"):
    """The cache's fidelity passes under FIXED: process 0's alone (the first rows), never shared."""
    cfg, answers = get_preset(preset), Lengths.guess(get_preset(preset)).train_answers
    vocab = timeplan._shapes(cfg)[0].vocab
    return timeplan.FIDELITY_PASSES * sum(answers[:timeplan.FIDELITY_ROWS]) * vocab / FIXED.softmax


def test_more_work_takes_longer_and_processes_share_the_cache_not_the_steps(monkeypatch):
    monkeypatch.setattr(timeplan, "usable_cores", lambda: 64.0)  # cores enough for every process's threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    base = _plan().seconds()
    train = get_preset("pocket").train
    longer = _plan(overrides=[f"train.max_steps={2 * train.max_steps}", f"train.eval_every={2 * train.eval_every}",
                              f"train.checkpoint_every={2 * train.checkpoint_every}"]).seconds()
    # twice the steps and held-out scores; the held-out split's own cache is built once either way
    assert 1.5 * base["6. Distillation"] < longer["6. Distillation"] < 2 * base["6. Distillation"]
    assert longer["4b. Teacher cache"] == base["4b. Teacher cache"]
    two = _plan(processes=2).seconds()
    fidelity = _fidelity_seconds()
    assert two["4b. Teacher cache"] == pytest.approx((base["4b. Teacher cache"] - fidelity) / 2 + fidelity, abs=0.02)
    # each process takes train.batch_size rows of a global batch that grows with the processes (batches.GlobalBatches):
    # the same number of steps, each as long (typical lengths: every row alike)
    assert two["6. Distillation"] == pytest.approx(base["6. Distillation"], rel=0.01)
    assert "per process (2 in all)" in str(_plan(processes=2))
    assert two["5. Before training"] == base["5. Before training"]  # evaluation runs on process 0
    assert "shared by 2 processes" in str(_plan(processes=2))
    slower = time_plan(get_preset("pocket"), "cpu", throughput=dataclasses.replace(FIXED, flops=50e9))
    assert slower.seconds()["4b. Teacher cache"] > 1.5 * base["4b. Teacher cache"]  # the matmuls dominate
    assert "6b. Baseline" not in _plan(overrides=["eval.baseline=false"]).seconds()


def test_processes_on_a_cpu_with_too_few_cores_share_them_and_the_plan_says_so(monkeypatch):
    monkeypatch.setattr(timeplan, "usable_cores", lambda: 2.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    base, two = _plan(), _plan(processes=2)
    assert "2 processes of 2 torch threads share 2 cores: each at 50% of the probed rates" in str(two)
    assert not any("share" in n for n in base.notes)
    fidelity = _fidelity_seconds()  # at half the rate too; each process's share of the rows at half the rate
    cache = base.seconds()["4b. Teacher cache"]
    assert two.seconds()["4b. Teacher cache"] == pytest.approx((cache - fidelity) + 2 * fidelity, rel=0.01)
    assert two.seconds()["6. Distillation"] > 1.9 * base.seconds()["6. Distillation"]  # each step at half the rate
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # torchrun's one thread a process: the cores suffice
    assert "share" not in "".join(_plan(processes=2).notes)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # a container's quota under the host's core count:
    assert "2 processes of 2 torch threads share 2 cores: each at 50%" in str(_plan(processes=2))  # threads capped


def test_on_policy_steps_and_recomputation_are_planned():
    base = _plan().stages
    distil = {s.title: s for s in base}["6. Distillation"]
    assert "s a step: a checkpoint every" in distil.detail and "on-policy" not in distil.detail
    half = {s.title: s for s in _plan(overrides=["train.on_policy=0.5"]).stages}["6. Distillation"]
    full = {s.title: s for s in _plan(overrides=["train.on_policy=1"]).stages}["6. Distillation"]
    assert "(50% on-policy)" in half.detail and "(100% on-policy)" in full.detail
    # a rollout step samples, runs the live teacher and trains on longer rows: dearer than a cached step
    assert distil.seconds < half.seconds < full.seconds
    assert half.seconds - distil.seconds == pytest.approx((full.seconds - distil.seconds) / 2, rel=0.05)
    steps = get_preset("pocket").train.max_steps
    preview = {s.title: s for s in _plan(overrides=[f"eval.on_policy_preview={steps}"]).stages}
    assert preview["6c. On-policy preview"].seconds == pytest.approx(full.seconds, rel=0.1)  # the same steps
    recompute = _plan(overrides=["train.gradient_checkpointing=true"])
    assert distil.seconds < {s.title: s for s in recompute.stages}["6. Distillation"].seconds < 1.34 * distil.seconds
    assert recompute.step_seconds > _plan().step_seconds > 0


def test_a_gpu_reads_its_weights_once_a_step_whatever_the_rows():
    t4 = timeplan.gpu_throughput("t4")
    assert t4.stream_at(1, cpu=False) == t4.stream_at(64, cpu=False) == t4.stream_at(256, cpu=False) == t4.bandwidth
    probed = dataclasses.replace(FIXED, stream_rows=((16, 9e9), (32, 8e9), (64, 6e9)))
    assert probed.stream_at(128, cpu=False) == 6e9  # a GPU beyond the probed rows: the last point's rate
    assert probed.stream_at(128, cpu=True) == 3e9  # a CPU's step beyond them is compute-bound: time grows with rows
    assert probed.stream_at(48, cpu=True) == probed.stream_at(48, cpu=False) == 7e9  # between points: interpolated
    # generation on a T4 no longer costs ten times a CPU's per row: the batch's step reads the weights once
    before = {s.title: s.seconds for s in time_plan(get_preset("t4"), "t4").stages}["5. Before training"]
    assert before < 10 * 60


def test_the_plan_command_refuses_a_probe_with_a_named_gpu_and_processes_below_one(capsys):
    assert main(["plan", "--preset", "tiny", "--gpu", "t4", "--probe"]) == 2
    assert "--probe measures this machine" in capsys.readouterr().err
    assert main(["plan", "--preset", "tiny", "--gpu", "t4"]) == 0  # the advice followed: --probe dropped
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            main(["plan", "--preset", "tiny", "--processes", bad])
        assert "--processes" in capsys.readouterr().err


def test_real_lengths_replace_the_typical_ones(tiny_tokenizer):
    train = tokenize_examples(load_gsm_symbolic(12, seed=3)[0], tiny_tokenizer, max_length=384)
    held = tokenize_examples(load_gsm_symbolic(4, seed=4)[0], tiny_tokenizer, max_length=384)
    lengths = Lengths.of(train, held)
    assert len(lengths.train) == 12 and len(lengths.eval_answers) == 4 and not lengths.typical
    assert all(0 < a < n for a, n in zip(lengths.train_answers, lengths.train))
    plan = _plan("tiny", lengths=lengths)
    assert not plan.typical_lengths and "tokenized splits' lengths" in str(plan)
    guessed = _plan("tiny")
    assert guessed.typical_lengths and "not tokenized yet" in str(guessed)
    assert len(Lengths.guess(get_preset("pocket-text")).train) == get_preset("pocket-text").generate.num_samples


def test_gpu_plans_use_the_public_figures_and_name_them():
    plan = time_plan(get_preset("t4"), "t4")
    assert "public peaks" in plan.throughput.source and "not measured" in plan.throughput.source
    assert plan.throughput.flops == pytest.approx(65e12 * timeplan.GPU_EFFICIENCY)
    with pytest.raises(TimePlanError, match="Unknown GPU 'v100'"):
        timeplan.gpu_throughput("v100")


def test_the_probe_runs_once_per_machine_then_is_read_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path))
    calls = []

    def fake_probe(device, dtype):
        calls.append(str(device))
        return dataclasses.replace(FIXED, source="probed today")
    monkeypatch.setattr(timeplan, "probe", fake_probe)
    first = timeplan.measured("cpu")
    again = timeplan.measured("cpu")
    assert calls == ["cpu"] and first.flops == again.flops and again.source.startswith("cached probe")
    assert timeplan.measured("cpu", refresh=True).source == "probed today" and len(calls) == 2
    assert json.loads((tmp_path / "throughput.json").read_text())  # keyed by machine, threads, torch, dtype


def test_a_short_real_probe_gives_positive_figures_naming_the_cpu():
    got = timeplan.probe("cpu", seconds=0.3)
    assert got.flops > 1e8 and got.bandwidth > 1e7 and 0 < got.op_seconds < 0.01
    assert got.device.startswith("CPU") and "torch threads" in got.device


def test_compared_rows_and_total():
    rows = compared({"a": 10.0, "b": 20.0, "c": 5.0}, {"a": 12.0, "b": 18.0})
    assert rows[:2] == [{"section": "a", "planned_s": 10.0, "measured_s": 12.0, "ratio": 1.2},
                        {"section": "b", "planned_s": 20.0, "measured_s": 18.0, "ratio": 0.9}]
    assert rows[-1] == {"section": "total", "planned_s": 30.0, "measured_s": 30.0, "ratio": 1.0}


def test_plan_command_prints_the_time_plan(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(timeplan, "local_throughput", lambda gpu=None, refresh=False: FIXED)
    assert main(["plan", "--preset", "pocket", "--gpu", "cpu", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "time plan on test machine" in out and "4b. Teacher cache" in out
    assert "2 processes" in out


def test_a_plan_made_again_keeps_the_estimates_of_sections_already_run():
    first = _plan()
    again = _plan(overrides=["train.max_steps=80"])
    changed = dataclasses.replace(first.stages[0], seconds=first.stages[0].seconds + 25.0)  # e.g. a dequantization
    first.stages[0] = changed
    again.keep(first, {changed.title: 30.0})
    assert again.stages[0] == changed
    assert again.seconds()["6. Distillation"] > first.seconds()["6. Distillation"]  # not run yet: the new estimate


def test_a_probe_on_cold_memory_says_so_takes_a_warm_fault_and_is_not_cached(tmp_path, monkeypatch):
    """A fresh VM's first minutes: fresh memory faults at ~6 us a page instead of ~0.75; the probe warms memory and
    measures again, and if it stays cold it plans with a warm machine's fault and is measured again next run."""
    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path))
    block = torch.zeros(256, 32768)
    pages = block.numel() * 4 / 4096
    reused_s = block.numel() / 3e9
    for fault_s, want_cold in ((6e-6, True), (0.8e-6, False)):
        rates = iter([block.numel() / (reused_s + pages * fault_s), 3e9] * 3)
        monkeypatch.setattr(timeplan, "_timed_rate", lambda *a, rates=rates, **k: next(rates))
        _, reused, fault = timeplan.fresh_memory_rate(block, 0.1, lambda: None)
        assert fault == pytest.approx(fault_s) and reused == 3e9
        assert (next(rates, None) is None) == want_cold  # cold: measured three times; warm: once
    monkeypatch.undo()
    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path))
    cold = block.numel() / (reused_s + pages * 6e-6)
    monkeypatch.setattr(timeplan, "_timed_rate", lambda *a, **k: 1e9)  # the probe's other rates: not the point
    monkeypatch.setattr(timeplan, "_COLD", {})
    probes = []
    monkeypatch.setattr(timeplan, "fresh_memory_rate", lambda *a, **k: probes.append(1) or (cold, 3e9, 6e-6))
    got = timeplan.measured("cpu")
    assert timeplan.measured("cpu") is got and len(probes) == 1  # the run's second plan: the same figures
    warm = 1 / (1 / 3e9 + timeplan.WARM_FAULT_SECONDS * 4 / 4096)
    assert got.cold and got.softmax == pytest.approx(warm) and got.softmax > 4 * cold
    assert "memory still cold (6.0 us per page fault)" in got.source and "not cached" in got.source
    assert not (tmp_path / "throughput.json").exists()
    monkeypatch.setattr(timeplan, "fresh_memory_rate", lambda *a, **k: (9e8, 3e9, 0.8e-6))
    warm_probe = timeplan.measured("cpu", refresh=True)
    assert not warm_probe.cold and warm_probe.softmax == 9e8 and (tmp_path / "throughput.json").exists()


def test_a_probe_on_a_busy_machine_says_so_and_is_not_cached(tmp_path, monkeypatch):
    """Another program on the cores while the probe multiplies (a build, a second run): the probe's figures are
    a fraction of the machine's, so they are used for this run and said, never cached for the next."""
    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path))
    monkeypatch.setattr(timeplan, "_timed_rate", lambda *a, **k: 1e9)
    monkeypatch.setattr(timeplan, "fresh_memory_rate", lambda *a, **k: (9e8, 3e9, 0.8e-6))
    monkeypatch.setattr(timeplan, "_COLD", {})
    monkeypatch.setattr(timeplan, "cpu_share", lambda *a: 0.48)
    got = timeplan.measured("cpu")
    assert got.busy and "the machine was busy (this process had 48% of the" in got.source
    assert "not cached" in got.source and not (tmp_path / "throughput.json").exists()
    assert timeplan.measured("cpu") is got  # the run's second plan: the same figures, not a second probe
    monkeypatch.setattr(timeplan, "cpu_share", lambda *a: 0.97)
    quiet = timeplan.measured("cpu", refresh=True)
    assert not quiet.busy and "busy" not in quiet.source and (tmp_path / "throughput.json").exists()
    assert not timeplan.measured("cpu").busy  # read back from the cache


def test_usable_cores_follow_the_affinity_and_a_containers_quota(tmp_path, monkeypatch):
    """A container limited to half a core on a 2-core host: the probe expects half a core's CPU time, so it does
    not call the quota another program."""
    monkeypatch.setattr(timeplan.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert timeplan.usable_cores(tmp_path) == 2.0  # no quota files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert timeplan.usable_cores(tmp_path) == 2.0
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert timeplan.usable_cores(tmp_path) == 0.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert timeplan.usable_cores(tmp_path) == 1.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert timeplan.usable_cores(tmp_path) == 2.0


def test_cpu_share_is_cpu_time_over_wall_time_and_threads(monkeypatch):
    clock = {"cpu": 10.0, "wall": 100.0}
    monkeypatch.setattr(timeplan.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(timeplan.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(timeplan, "_threads", lambda: 2)
    clock.update(cpu=12.0, wall=102.0)  # 2 CPU-seconds in 2 s on 2 threads: half the cores
    assert timeplan.cpu_share(10.0, 100.0) == pytest.approx(0.5)
    clock.update(cpu=14.0)
    assert timeplan.cpu_share(10.0, 100.0) == pytest.approx(1.0)
    clock.update(cpu=10.0, wall=100.01)  # 10 ms: too short to tell, not called busy
    assert timeplan.cpu_share(10.0, 100.0) == 1.0


def test_the_teachers_held_out_pass_is_planned_once_when_its_states_are_kept():
    """With agreement measured, section 5's pass keeps the teacher's held-out states: the held-out cache (section 6)
    and the trained students' agreement (section 7) cost its output layer alone. Without agreement the cache runs
    the whole teacher, and section 7 measures no agreement but scores each student's perplexity itself when no
    training scored it."""
    on = _plan().seconds()
    off = _plan(overrides=["eval.agreement=false"]).seconds()
    assert off["6. Distillation"] > on["6. Distillation"]  # the teacher's whole forward over the held-out split
    # section 5: the untrained student's own perplexity pass takes the place of its part of the agreement pass
    assert off["5. Before training"] == pytest.approx(on["5. Before training"])
    unscored_on = _plan(overrides=["train.eval_every=0"]).seconds()
    unscored_off = _plan(overrides=["train.eval_every=0", "eval.agreement=false"]).seconds()
    # with agreement the pass scores the trained students' perplexity too; without it, each is scored alone
    assert unscored_on["7. Evaluation after"] - on["7. Evaluation after"] < 1e-9
    assert unscored_off["7. Evaluation after"] > off["7. Evaluation after"]


def test_a_second_run_plans_the_answers_and_the_cache_it_finds_on_disk_as_reused(tmp_path, capsys):
    """The time plan of a run whose teacher texts and top-k cache another run wrote (the same teacher_cache.dir)
    plans those sections at no cost, and says where it found them; the first run planned them in full."""
    from pocket_teacher.experiment import Experiment, configure

    shared = [f"teacher_cache.dir={tmp_path / 'cache'}"]
    plans = []
    for name in ("first", "second"):
        exp = Experiment(configure("tiny-text", [*shared, f"run.out_dir={tmp_path / name}"]), progress=False)
        for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
            getattr(exp, method)()
        plans.append({s.title: s for s in exp.time_plan.stages})
        for again in ("configure", "load_student"):  # cells run again: what already ran keeps its plan
            getattr(exp, again)()
            assert {s.title: s for s in exp.time_plan.stages}["4b. Teacher cache"] == plans[-1]["4b. Teacher cache"]
    out = capsys.readouterr().out
    first, second = plans
    for title in ("3b. Teacher answers", "4b. Teacher cache"):
        assert first[title].seconds > 0 and "found built" not in first[title].detail
        assert second[title].seconds == 0 and "found built in " + str(tmp_path / "cache") in second[title].detail
        assert f"time plan: {title} found built in {tmp_path / 'cache'}" in out
    assert exp.cache.report.status == "reused"  # what the plan foresaw


def test_a_section_found_partly_done_keeps_the_rest_of_its_estimate():
    plan = _plan()
    cache = plan.seconds()["4b. Teacher cache"]
    line = plan.reuse("4b. Teacher cache", 0.25, "runs/x/cache.partial")
    assert "25% found built in runs/x/cache.partial" in line
    assert plan.seconds()["4b. Teacher cache"] == pytest.approx(0.75 * cache, abs=0.01)
    assert plan.reuse("4b. Teacher cache", 0.0, "nowhere") is None and plan.reuse("no such", 1.0, "x") is None


def test_the_first_dequantization_is_planned_at_the_probed_elementwise_rate(monkeypatch):
    monkeypatch.setattr(timeplan, "_dequantized_already", lambda: False)
    slow = dataclasses.replace(FIXED, elementwise=FIXED.softmax / 2)
    fresh = {t: time_plan(get_preset("pocket"), "cpu", throughput=th).stages[0] for t, th in (("fast", FIXED),
                                                                                               ("slow", slow))}
    assert all(s.detail.startswith("dequantize the GGUF once") for s in fresh.values())
    params = timeplan._shapes(get_preset("pocket"))[0].params
    extra = params * timeplan.DEQUANTIZE_PASSES / FIXED.softmax
    assert fresh["slow"].seconds - fresh["fast"].seconds == pytest.approx(extra)  # twice the time at half the rate
    # one process converts while the others wait: processes sharing the cores do not slow it down
    monkeypatch.setattr(timeplan, "usable_cores", lambda: 2.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert _plan(processes=2).stages[0].seconds == pytest.approx(fresh["fast"].seconds)
    monkeypatch.setattr(timeplan, "_dequantized_already", lambda: True)
    assert _plan().stages[0].seconds == pytest.approx(fresh["fast"].seconds - extra)  # loaded, not dequantized
    # a GPU's plan: the host CPU converts (not the GPU's rate), on a machine that has not done it yet
    t4 = time_plan(get_preset("pocket"), "t4").stages[0]
    assert t4.detail.startswith("dequantize") and t4.seconds > params / timeplan.DEQUANTIZE_HOST_PARAMS_PER_S
