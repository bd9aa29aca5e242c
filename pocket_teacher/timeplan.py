"""The time plan: each stage's wall time, estimated before anything loads, from the work it does.

    plan = time_plan(get_preset("pocket"))       # this machine, its throughput probed once and cached
    print(plan)                                  # seconds per notebook section and in total
    time_plan(cfg, gpu="t4")                     # a GPU named in plan.GPUS: public peaks at a stated efficiency

The work is counted from the shapes the memory plan knows and the token counts of the splits (the real ones once the
data are tokenized, `Lengths.of`; before, typical lengths of the data source): matmul FLOPs of every forward and
backward pass (the body on every padded token, the output layer on answer tokens only, attention on the padded
square), the weight and KV-cache bytes each decode step reads, and the small operations each layer launches. The
machine's side is `Throughput`: a few seconds of probes on the device the run will use (a matmul, a streaming read,
a small op), cached per machine, or for `gpu=` the public peak figures times `GPU_EFFICIENCY`. A stage's time is
then, pass by pass, max(FLOPs / matmul rate, bytes / bandwidth) + ops x the cost of one op.

`benchmarks/time_plan.py` compares the plan with the clock of finished runs (`timings.json` keeps both).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .batches import GlobalBatches, on_policy_step
from .config import ModelShape
from .data import IGNORE_INDEX
from .evaluate import WARMUP_TOKENS, mmlu_formats
from .files import write_text
from .models import cache_root, embedded_gguf_path, half_dtype, resolve_device
from .plan import GPUS, _shapes, dtype_bytes, get_device

# Typical token lengths per row under the SmolLM2 chat template, before the data are tokenized (measured on the
# presets' data: `Lengths.of` on their tokenized splits): (mean row, mean answer tokens, mean prompt) as fractions of
# data.max_length are not stable, so absolute means are kept, capped at the length limit.
TYPICAL = {"gsm_symbolic": (180, 84, 96), "gsm8k": (200, 120, 80), "teacher_text": (110, 100, 10),
           "text": (200, 190, 10)}

# GPU memory bandwidth (public figures, bytes/s), beside plan.GPUS' 16-bit tensor-core peaks.
GPU_BANDWIDTH = {"t4": 320e9, "l4": 300e9, "a10": 600e9, "a100-40": 1555e9, "a100-80": 2039e9, "h100": 3350e9,
                 "h200": 4800e9}
GPU_EFFICIENCY = 0.35  # the share of the peak matmul rate and bandwidth a run of these sizes reaches (stated, not
# measured: no GPU has run this project yet)
GPU_OP_SECONDS = 20e-6  # one small op on a GPU: Python dispatch and a kernel launch

# Small operations one decoder layer launches per forward (norms, projections, rotary, attention, MLP, residuals),
# the model's own per forward (embedding, final norm, masks), and a generation step's (logits processors, stopping
# criteria, concatenations); the backward pass launches about twice the forward's.
OPS_PER_LAYER = 40
OPS_PER_FORWARD = 60
OPS_PER_DECODE_STEP = 120
MATMUL_EFFICIENCY = 0.8  # a model's matmuls against the probe's (smaller and oddly shaped ones run slower)
CPU_ATTENTION_SQUARE = True  # on CPU with a padding mask SDPA takes the math path: the full (L, L) scores


PROBE = 8  # the probe's version: a cached probe of another version is measured again (8: busy probes, which
# version 7 could have cached, are caught)


class TimePlanError(ValueError):
    """The time plan cannot be made as asked; the message says what to give."""


# -- the machine ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    """What one device does per second: dense matmul FLOPs (in the compute dtype), bytes streamed from memory, and
    the seconds one small op costs (dispatch included)."""

    device: str
    flops: float
    bandwidth: float
    op_seconds: float
    source: str  # "probed <date>", "cached probe of <date>", or the GPU figures used
    weight_stream: float = 0.0  # weight bytes per second through a one-row matmul (a decode step's reads)
    elementwise: float = 0.0  # fp32 elements per second through a log-softmax into fresh memory (a loss's passes)
    stream_rows: tuple = ()  # ((rows, weight bytes per second), ...) through matmuls of that many rows
    sampling: float = 0.0  # vocabulary entries per second through a sampled decode step's softmax and draw
    cold: bool = False  # the probe found memory the host had not backed yet (`fresh_memory_rate`): not cached
    busy: bool = False  # another program held part of the cores during the probe (`cpu_share`): not cached

    def stream_at(self, rows: int, cpu: bool = True) -> float:
        """Weight bytes per second a decode step of `rows` rows reads: interpolated between the probed row counts;
        beyond the last, on a `cpu`, the step is compute-bound (its time grows with the rows). A GPU reads its
        weights once per step whatever the rows (its matmul time, counted apart, grows with them): beyond the probed
        rows, and with no probed rows at all (a GPU's public figures), the rate stays that of the last point."""
        points = [(1, self.stream)] + [tuple(p) for p in self.stream_rows]
        for (r0, s0), (r1, s1) in zip(points, points[1:]):
            if rows <= r1:
                return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        last_rows, last = points[-1]
        return last * last_rows / rows if cpu else last

    def __str__(self) -> str:
        return (f"{self.device}: matmul {self.flops / 1e9:,.0f} GFLOP/s, memory {self.bandwidth / 1e9:,.1f} GB/s, "
                f"weights through matmuls of 1/16/32/64 rows "
                f"{'/'.join(f'{self.stream_at(r, False) / 1e9:,.1f}' for r in (1, 16, 32, 64))} GB/s, log-softmax "
                f"{self.softmax / 1e6:,.0f} M elements/s, sampling {self.sample_rate / 1e6:,.0f} M entries/s, "
                f"{self.op_seconds * 1e6:.0f} us per small op ({self.source})")

    @property
    def stream(self) -> float:
        return self.weight_stream or self.bandwidth

    @property
    def softmax(self) -> float:
        return self.elementwise or self.bandwidth / 8

    @property
    def sample_rate(self) -> float:
        return self.sampling or self.softmax / 12  # unprobed (a GPU's public figures): about a dozen passes


def machine_name(device: torch.device) -> str:
    """The device as a timing should name it: the GPU, or the CPU model and the torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _timed_rate(fn, work: float, seconds: float, sync, rounds: int = 5) -> float:
    """`work` per call of `fn`, per second: calls repeated for about `seconds` after one warm-up, the median of
    `rounds` rounds (a run sees the machine's sustained rate: the best round catches bursts, about 10% above it on
    the 2-core VMs here, and plans came out short by that much)."""
    fn()
    sync()
    times = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed > seconds / rounds:
                break
        times.append(elapsed / n)
    return work / sorted(times)[len(times) // 2]


def probe(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 3.0) -> Throughput:
    """Measure this device: a (512 x 1024) @ (1024 x 1536) matmul; a 256 MiB streaming read; one row through 64 MiB
    of weights (a decode step is bound by reading them); a log-softmax of a (256 x 32768) block into fresh memory
    (the loss's elementwise passes); a softmax and one draw per row over a (16 x 32768) block (a sampled decode
    step: torch.multinomial, the cost of sampling on CPU); a small linear layer (one op's dispatch). About
    `seconds` x 1.5 in all (each rate the median of five rounds; a fresh VM's cold memory is caught and said, see
    `fresh_memory_rate`)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(512, 1024, device=device, dtype=dtype), torch.randn(1024, 1536, device=device, dtype=dtype)
    started = time.process_time(), time.perf_counter()
    flops = _timed_rate(lambda: a @ b, 2 * 512 * 1024 * 1536, seconds * 0.35, sync)
    share = cpu_share(*started) if device.type == "cpu" else 1.0
    big = torch.ones(64 << 20, device=device, dtype=torch.float32)
    bandwidth = _timed_rate(big.sum, big.numel() * 4, seconds * 0.15, sync)
    del big
    # a decoder's weights, as nn.Linear holds them (out x in), 576 wide as SmolLM2's (128 MiB in fp32: more than
    # a CPU's last cache), through matmuls of 1, 16, 32 and 64 rows (a decode step of that many sequences)
    layers = [torch.randn(*shape, device=device, dtype=dtype) for _ in range(24) for shape in ((1536, 576),
                                                                                              (576, 1536))]
    nbytes = sum(w.numel() * w.element_size() for w in layers)
    streams = []
    for rows in (1, 16, 32, 64):
        x, h = torch.randn(rows, 576, device=device, dtype=dtype), torch.randn(rows, 1536, device=device, dtype=dtype)
        streams.append((rows, _timed_rate(lambda: [torch.nn.functional.linear(x if w.shape[1] == 576 else h, w)
                                                   for w in layers], nbytes, seconds * 0.1, sync)))
    stream = streams[0][1]
    block = torch.randn(256, 32768, device=device, dtype=torch.float32)
    softmax, reused, fault = fresh_memory_rate(block, seconds * 0.15, sync)
    logits = torch.randn(16, 32768, device=device, dtype=torch.float32) * 8  # peaked, as a model's are
    sampling = _timed_rate(lambda: torch.multinomial(torch.softmax(logits, dim=-1), 1), logits.numel(),
                           seconds * 0.1, sync)
    x, w = torch.randn(8, 64, device=device, dtype=dtype), torch.randn(64, 64, device=device, dtype=dtype)
    per_op = 1 / _timed_rate(lambda: torch.nn.functional.linear(x, w), 1.0, seconds * 0.15, sync)
    cold = fault is not None and fault > COLD_FAULT_SECONDS
    source = f"probed {time.strftime('%Y-%m-%d')}"
    if cold:
        warm = 1 / (1 / reused + WARM_FAULT_SECONDS * block.element_size() / 4096)
        source += (f"; memory still cold ({fault * 1e6:.1f} us per page fault): the log-softmax rate "
                   f"{softmax / 1e6:,.0f} M/s taken as {warm / 1e6:,.0f} M/s, a warm machine's "
                   f"{WARM_FAULT_SECONDS * 1e6:.1f} us per fault; not cached, probed again next run")
        softmax = warm
    busy = share < BUSY_SHARE
    if busy:
        source += (f"; the machine was busy (this process had {share:.0%} of the {_threads():g} cores its threads "
                   f"ask for while it multiplied: another program is running), so the plan is for a machine that "
                   f"stays as busy; not cached, probed again next run")
    return Throughput(machine_name(device), flops, bandwidth, per_op, source, stream, softmax, tuple(streams[1:]),
                      sampling, cold, busy)


# A probe that shares its cores with another program (a build, a second run) measures a fraction of the machine;
# cached, it would make every later plan as slow (seen here: a probe taken while llama.cpp compiled on the other
# core planned a pocket run at 1,817 s that took 580 s). While torch multiplies on its threads, an idle machine gives
# the process about one CPU-second per thread per second: on the 2-core Xeon 0.997 idle, 0.61-0.69 beside one busy
# loop, 0.44-0.47 beside two (three probes each).
BUSY_SHARE = 0.75


def usable_cores(cgroup: str | Path = "/sys/fs/cgroup") -> float:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota (cgroup v2 cpu.max or
    v1 cfs_quota_us / cfs_period_us) where one is set; os.cpu_count() counts the host's and ignores both."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    root = Path(cgroup)
    for quota_file, period_file in ((root / "cpu.max", None),
                                    (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else period_file.read_text().strip())
            if quota not in ("max", "-1") and float(period) > 0:
                cores = min(cores, float(quota) / float(period))
        except (OSError, ValueError, IndexError):
            continue
    return max(cores, 1e-3)


def _threads() -> float:
    return max(1e-3, min(float(torch.get_num_threads()), usable_cores()))


def cpu_share(cpu_start: float, wall_start: float) -> float:
    """The share of its threads' cores this process had since `time.process_time()` was `cpu_start` and
    `time.perf_counter()` was `wall_start`: CPU time over wall time times the torch threads (at most the cores it
    may use, `usable_cores`: a container's quota is not another program);
    1.0 for a span under 50 ms, too short for the CPU clock to tell."""
    wall = time.perf_counter() - wall_start
    return (time.process_time() - cpu_start) / (wall * _threads()) if wall >= 0.05 else 1.0


# A page fault slower than COLD_FAULT_SECONDS is the host backing a page for the first time, not the guest mapping a
# page it already had: on the 2-core VMs here a fresh machine's first minutes faulted at about 6 us a page (a
# log-softmax into fresh memory probed at 154 M elements/s) where the same machine, warm, faults at 0.75 us
# (WARM_FAULT_SECONDS; 940 M/s), and the run itself went at the warm rate (pocket-text's work sections took 0.75-1.04
# of the warm probe's plan, 0.37-0.66 of the cold one's).
# The threshold sits between warm (0.75 us here; twice that on a machine twice as slow, as the EPYC is: an estimate,
# no EPYC was probed) and cold (6 us).
COLD_FAULT_SECONDS = 4e-6
WARM_FAULT_SECONDS = 0.75e-6


def fresh_memory_rate(block: torch.Tensor, seconds: float, sync,
                      attempts: int = 3) -> tuple[float, float, Optional[float]]:
    """Elements per second of a log-softmax of `block` into fresh memory (as a loss makes its (N, V) blocks) and
    into a buffer it reuses, and the seconds per 4 KiB page that fresh memory cost (None on a GPU, whose allocator
    caches). Memory the host has not backed yet (a fresh VM) makes every fault several times dearer for a while:
    then the probe touches and frees 1 GiB, to warm the pages the allocator hands out next, and measures again,
    `attempts` times at most; the last figures are returned either way."""
    fresh = lambda: torch.log_softmax(block, dim=-1)
    if block.device.type != "cpu":
        rate = _timed_rate(fresh, block.numel(), seconds, sync)
        return rate, rate, None
    out = torch.empty_like(block)
    pages = block.numel() * block.element_size() / 4096
    for attempt in range(attempts):
        rate = _timed_rate(fresh, block.numel(), seconds, sync)
        reused = _timed_rate(lambda: torch.log_softmax(block, dim=-1, out=out), block.numel(), seconds / 3, sync)
        fault = max(0.0, block.numel() / rate - block.numel() / reused) / pages
        if fault <= COLD_FAULT_SECONDS:
            break
        if attempt + 1 < attempts:
            torch.ones(256 << 20, dtype=torch.float32).fill_(2.0)  # 1 GiB touched and freed
    return rate, reused, fault


def cache_file() -> Path:
    return Path(os.environ.get("POCKET_TEACHER_CACHE", Path.home() / ".cache" / "pocket_teacher")) / "throughput.json"


_COLD: dict[str, Throughput] = {}  # probes that found cold memory or a busy machine: never cached, reused in-process


def measured(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             refresh: bool = False) -> Throughput:
    """This device's `probe`, cached per machine (device name, threads, torch version, dtype) in `cache_file()`."""
    device = torch.device(device)
    key = f"{machine_name(device)} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')} | probe {PROBE}"
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and not refresh:
        got = known[key]
        return Throughput(**{**got, "stream_rows": tuple(tuple(p) for p in got.get("stream_rows", ())),
                             "source": f"cached probe ({got['source']}, {path})"})
    if key in _COLD and not refresh:
        return _COLD[key]  # this process probed cold memory already: its second plan uses the same figures
    result = probe(device, dtype)
    if result.cold or result.busy:
        _COLD[key] = result  # a fresh VM's first minutes, or a busy machine: kept for this process, probed next run
        return result
    try:  # written whole, then renamed: a process reading the cache at the same moment never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({**known, key: asdict(result)}, indent=1))
    except OSError:
        pass  # a read-only home: the probe runs again next time
    return result


def local_throughput(gpu: Optional[str] = None, refresh: bool = False) -> Throughput:
    """This machine's `measured` throughput: its GPU (gpu=None and one is there) in the 16-bit type a run computes
    in there (bf16 on sm80+, fp16 on a T4: `models.half_dtype`), else its CPU in fp32."""
    if gpu is None and torch.cuda.is_available():
        device = resolve_device("auto")
        return measured(device, half_dtype(device), refresh=refresh)
    return measured("cpu", torch.float32, refresh=refresh)


def gpu_throughput(name: str) -> Throughput:
    """A GPU of `plan.GPUS` from its public figures: 16-bit tensor-core peak and memory bandwidth, each at
    `GPU_EFFICIENCY`."""
    if name not in GPUS:
        raise TimePlanError(f"Unknown GPU {name!r}: use one of {', '.join(GPUS)}.")
    gpu = GPUS[name]
    return Throughput(gpu.name, gpu.tflops * 1e12 * GPU_EFFICIENCY, GPU_BANDWIDTH[name] * GPU_EFFICIENCY,
                      GPU_OP_SECONDS, f"public peaks x {GPU_EFFICIENCY:.0%}, not measured")


# -- the work ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lengths:
    """Token lengths of the rows of the splits a run reads: whole rows and their answer tokens (the scored ones),
    training and held-out; `typical` when the data are not tokenized yet."""

    train: tuple[int, ...]
    train_answers: tuple[int, ...]
    eval: tuple[int, ...]
    eval_answers: tuple[int, ...]
    typical: bool = False
    mmlu: Optional[int] = None  # MMLU questions loaded (eval.mmlu_source); None: counted from the config

    @classmethod
    def of(cls, train, held_out, mmlu: Optional[Sequence] = None) -> "Lengths":
        """From tokenized splits (`data.TokenizedSplit`), and the MMLU questions loaded (if any)."""
        def answers(split):
            return tuple(sum(1 for t in f["labels"][1:] if t != IGNORE_INDEX) for f in split.features)
        return cls(tuple(len(f["input_ids"]) for f in train.features), answers(train),
                   tuple(len(f["input_ids"]) for f in held_out.features), answers(held_out),
                   mmlu=None if mmlu is None else len(mmlu))

    @classmethod
    def guess(cls, cfg) -> "Lengths":
        """Before the data are tokenized: every row at the data source's typical length (capped by the limits)."""
        row, answer, _ = TYPICAL.get(cfg.data.source, TYPICAL["text"])
        n_train = cfg.data.train_size if cfg.data.source != "teacher_text" else cfg.generate.num_samples
        n_eval = cfg.data.eval_size
        train, held = min(row, cfg.data.max_length), min(row, cfg.eval.max_length)
        return cls((train,) * n_train, (min(answer, train),) * n_train, (held,) * n_eval,
                   (min(answer, held),) * n_eval, typical=True)


# MMLU rows in tokens under the SmolLM2 tokenizer, the deciles of 2,000 questions of the MMLU test split (a long tail:
# padding and attention follow the spread, not the mean): the zero-shot letter prompt (mean 125), and a cloze
# (context, choice) pair (mean 87, the choice 8 of them); each shot adds about 107 and 69 (measured on 600).
MMLU_LETTER = (52, 60, 67, 76, 87, 100, 118, 134, 201, 327)
MMLU_CLOZE = (32, 36, 40, 44, 50, 58, 73, 98, 144, 265)
MMLU_LETTER_SHOT, MMLU_CLOZE_SHOT, MMLU_CHOICE = 107, 69, 8
MMLU_OVERHEAD = 1.3  # tokenizing the prompts and the per-batch work around the passes: fitted on the pocket teacher
# (114 questions, both formats, the 2-core Xeon: 66 s measured against 51 s planned without it)
MMLU_TEST_QUESTIONS, MMLU_SUBJECTS = 14042, 57  # cais/mmlu's test split


def mmlu_questions(ev) -> int:
    """The MMLU questions eval.* asks to score, before they are loaded: eval.mmlu_samples when set, else the
    source's questions (a local file's lines, read for their subjects when eval.mmlu_subjects is set; the Hub's
    test split, its share of subjects)."""
    if not ev.mmlu_source:
        return 0
    if ev.mmlu_source == "hub":
        total = MMLU_TEST_QUESTIONS * (len(ev.mmlu_subjects) / MMLU_SUBJECTS if ev.mmlu_subjects else 1)
    else:
        try:
            lines = [line for line in Path(ev.mmlu_source).expanduser().read_text(encoding="utf-8").split("\n")
                     if line.strip()]
        except (OSError, UnicodeDecodeError):
            lines = []  # the loader will name what is wrong
        if ev.mmlu_subjects:
            wanted = set(ev.mmlu_subjects)
            lines = [line for line in lines if any(f'"{s}"' in line for s in wanted)]
        total = len(lines)
    return min(int(total), ev.mmlu_samples) if ev.mmlu_samples else int(total)


# The embedded GGUF read, dequantized into fp32 and saved the first time (gguf's numpy dequantization and
# transformers' conversion: elementwise work on the host CPU, one process converting while the others wait), per
# teacher parameter, in passes at the host's probed log-softmax rate. The first loads of SmolLM2-135M recorded in
# results/ (section 3 less the plan's own load term), each with its run's probe: 111 passes (19.99 s at 919 M/s,
# pocket_aa934b6, Xeon), 108 (25.99 s at 652 M/s, pocket_8a0cf33, Xeon), 108 (48.31 s at 327 M/s, pocket, EPYC),
# 82 (48.67 s at 247 M/s, pocket_epyc_64steps, the same EPYC host probed slower); the median is kept. (Seen once,
# in no results file: 22.7 s at 788 M/s on a third Xeon, 108.)
DEQUANTIZE_PASSES = 108
# A GPU plan does not probe its host CPU: the conversion at a 2-core Xeon's rate (Colab's hosts have two vCPUs;
# 134.5M parameters in 16-22 s on the Xeon loads above).
DEQUANTIZE_HOST_PARAMS_PER_S = 7e6
LOAD_BYTES_PER_S = 200e6  # reading and building a model's weights (safetensors, the dequantized GGUF cache)
DISK_BYTES_PER_S = 300e6  # writing checkpoints
ELEMENTWISE_PASSES = 4  # log-softmax-sized passes over an (N, V) block in evaluation (perplexity, top-k, agreement)
# A training step, measured with torch.profiler on the pocket and pocket-text students (CPU, fp32): the linear
# layers' matmuls run at the probe's rate; attention (forward and backward) at about half of it; the loss makes a few
# log-softmax-sized passes over its (answers, V) logits; the activations' elementwise ops (norms, rotary, SiLU,
# residuals: forward and backward) about 4.5 passes over (tokens, layers x (hidden + intermediate)); AdamW, the
# gradient norm and zeroing the gradients read and write about 92 bytes per parameter. The notebook's steps then run
# TRAIN_OVERHEAD times that (batching, the history, the optimizer loop's bookkeeping): 1.17-1.22, the same on both.
TRAIN_ATTENTION_EFFICIENCY = 0.5
LOSS_PASSES = 4
ACTIVATION_PASSES = 4.5
OPTIMIZER_BYTES = 92
TRAIN_OVERHEAD = 1.2
DECODE_OVERHEAD = 1.5  # transformers' generate reads the weights in more, smaller matmuls than the probe (q, k, v
# apart; the (rows, V) output layer) and builds masks and positions each step: fitted on the pocket preset (CPU)
SAMPLING_FACTOR = 2.1  # a sampled decode step's draw (temperature, nucleus, softmax, multinomial over the vocabulary)
# against the probe's softmax and multinomial: measured on the pocket student and teacher at 8, 32 and 64 rows (CPU)
FIDELITY_ROWS, FIDELITY_PASSES = 32, 40  # the cache's fidelity rows (teacher_cache.Fidelity) and their passes
DECODE_PASSES = 2  # the same over a decode step's (rows, V) logits (logits processors, argmax)


class Coster:
    """Seconds of model passes on a `Throughput`: FLOPs at the matmul rate (times `MATMUL_EFFICIENCY`), the (N, V)
    blocks of the output layer at the log-softmax rate (`ELEMENTWISE_PASSES` of them in evaluation), plus each op's
    cost; a decode step reads every weight through matmuls of its rows (`stream_at`) and copies its growing KV
    cache; a training step is costed as `train_step` says."""

    def __init__(self, throughput: Throughput, cpu: bool):
        self.t, self.cpu = throughput, cpu

    def matmul(self, flops: float) -> float:
        return flops / (self.t.flops * MATMUL_EFFICIENCY)

    def ops(self, n: float) -> float:
        return n * self.t.op_seconds

    def streamed(self, nbytes: float) -> float:
        return nbytes / self.t.bandwidth

    def body(self, shape: ModelShape, batches: Sequence[tuple[int, int]]) -> float:
        """The decoder layers' forward over `batches` of (rows, padded length)."""
        d, seconds = shape.heads * shape.head_dim, 0.0
        for rows, length in batches:
            square = length * length if self.cpu and CPU_ATTENTION_SQUARE else length * (length + 1) / 2
            flops = 2 * rows * length * shape.layers * shape.layer_linear_params + 4 * rows * square * d * shape.layers
            seconds += self.matmul(flops) + self.ops(OPS_PER_FORWARD + OPS_PER_LAYER * shape.layers)
        return seconds

    def forward(self, shape: ModelShape, batches: Sequence[tuple[int, int]], answers: int) -> float:
        """Forward passes over `batches`, the output layer on `answers` tokens only (a log-softmax and top-k or
        loss over each of their (N, V) rows)."""
        return self.body(shape, batches) + self.output(shape, answers)

    def output(self, shape: ModelShape, answers: int, passes: float = ELEMENTWISE_PASSES) -> float:
        return self.matmul(2 * answers * shape.vocab * shape.hidden) + passes * answers * shape.vocab / self.t.softmax

    def decode(self, shape: ModelShape, batches: Sequence[tuple[int, int]], steps: float, weight_bytes: float,
               sampled: bool = False) -> float:
        """Generation: each batch of (rows, prompt length) prefilled, then `steps` decode steps, each reading every
        weight once, its matmul FLOPs, copying the KV cache (it grows by concatenation), its logits and its ops;
        `sampled`: each step also draws a token per row from the whole vocabulary."""
        seconds = self.forward(shape, batches, 0)
        per_step_ops = OPS_PER_DECODE_STEP + OPS_PER_FORWARD + OPS_PER_LAYER * shape.layers
        for rows, prompt in batches:
            flops = 2 * rows * (shape.layers * shape.layer_linear_params + shape.vocab_rows * shape.hidden)
            flops += 4 * rows * (prompt + steps / 2) * shape.heads * shape.head_dim * shape.layers
            kv = 2 * shape.layers * shape.kv_dim * rows * (prompt + steps / 2) * 4
            reads = weight_bytes / self.t.stream_at(rows, self.cpu)
            step = (DECODE_OVERHEAD * max(reads, self.matmul(flops)) + 2 * self.streamed(kv)
                    + DECODE_PASSES * rows * shape.vocab / self.t.softmax + self.ops(per_step_ops))
            if sampled:
                step += SAMPLING_FACTOR * rows * shape.vocab / self.t.sample_rate
            seconds += steps * step
        return seconds

    def train_step(self, shape: ModelShape, batches: Sequence[tuple[int, int]], answers: int,
                   recompute: bool = False) -> float:
        """One optimizer step over micro-`batches` of (rows, padded length) with `answers` scored tokens in all:
        forward and backward (three times the forward's matmul FLOPs: the linear layers at the probe's rate,
        attention at `TRAIN_ATTENTION_EFFICIENCY` of it; the activations' `ACTIVATION_PASSES`), the loss's
        `LOSS_PASSES` over the (answers, V) logits and the output layer's matmuls, and the AdamW update
        (`OPTIMIZER_BYTES` per parameter), all times `TRAIN_OVERHEAD`; a few ops per tensor. `recompute`
        (train.gradient_checkpointing): the decoder layers' forward runs again in backward, four passes for three."""
        d, seconds, passes = shape.heads * shape.head_dim, 0.0, 4 if recompute else 3
        for rows, length in batches:
            tokens = rows * length
            seconds += passes * 2 * tokens * shape.layers * shape.layer_linear_params / self.t.flops
            seconds += (passes * 4 * rows * length * length * d * shape.layers
                        / (self.t.flops * TRAIN_ATTENTION_EFFICIENCY))
            seconds += (ACTIVATION_PASSES * passes / 3 * tokens * shape.layers * (shape.hidden + shape.intermediate)
                        / self.t.softmax)
            seconds += self.ops(passes * (OPS_PER_FORWARD + OPS_PER_LAYER * shape.layers))
        seconds += 3 * 2 * answers * shape.vocab * shape.hidden / self.t.flops
        seconds += LOSS_PASSES * answers * shape.vocab / self.t.softmax
        seconds += self.streamed(OPTIMIZER_BYTES * shape.params) + self.ops(12 * (9 * shape.layers + 3))
        return TRAIN_OVERHEAD * seconds


def batched(lengths: Sequence[int], batch_size: int, by_length: bool = False) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch of consecutive (or, `by_length`, sorted) rows."""
    ordered = sorted(lengths) if by_length else list(lengths)
    return [(len(ordered[i:i + batch_size]), max(ordered[i:i + batch_size])) for i in range(0, len(ordered),
                                                                                          batch_size)]


# -- the plan ------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One notebook section's planned seconds and what they are made of."""

    title: str
    seconds: float
    detail: str


@dataclass
class TimePlan:
    """Planned seconds per section (titles as in timings.json), the machine and the lengths it assumed."""

    throughput: Throughput
    stages: list[StagePlan]
    typical_lengths: bool
    processes: int = 1
    notes: list[str] = field(default_factory=list)
    step_seconds: float = 0.0  # one distillation step (train.checkpoint_every: `checkpoint_every`)

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.stages)

    def keep(self, earlier: "TimePlan", done) -> None:
        """Take `earlier`'s estimates for the sections in `done` (already run when this plan was made: the plan
        before a section ran is the one to hold against its clock, e.g. a first dequantization it counted)."""
        before = {s.title: s for s in earlier.stages}
        self.stages = [before[s.title] if s.title in done and s.title in before else s for s in self.stages]

    def reuse(self, title: str, share: float, where: str | Path) -> Optional[str]:
        """Section `title` finds `share` of its work done before (a cache or generated answers on disk, found before
        the section runs): its estimate keeps only the rest. Returns the line that says so (None: no such section,
        or nothing found)."""
        for i, stage in enumerate(self.stages):
            if stage.title == title and share > 0:
                found = "found built" if share >= 1 else f"{share:.0%} found built"
                self.stages[i] = StagePlan(title, stage.seconds * (1 - min(1.0, share)),
                                           f"{stage.detail}; {found} in {where}")
                return (f"time plan: {title} {found} in {where}: {_short(self.stages[i].seconds)} planned instead "
                        f"of {_short(stage.seconds)}")
        return None

    def seconds(self) -> dict[str, float]:
        """Planned seconds per section, to 0.01 s (a `tiny` section takes a tenth of a second on a fast CPU)."""
        return {s.title: round(s.seconds, 2) for s in self.stages}

    def __str__(self) -> str:
        lengths = ("typical lengths of the data source (the data are not tokenized yet)" if self.typical_lengths
                   else "the tokenized splits' lengths")
        lines = [f"time plan on {self.throughput}; {lengths}"
                 + (f"; {self.processes} processes" if self.processes > 1 else "")]
        width = max(len(s.title) for s in self.stages)
        lines += [f"  {s.title:<{width}}  {_clock(s.seconds):>8}  {s.detail}" for s in self.stages]
        lines.append(f"  {'total':<{width}}  {_clock(self.total):>8}  (an estimate: `timings.json` keeps it beside the "
                     f"clock)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(seconds: float) -> str:
    """`_clock`, with a tenth of a second under 10 s (a `tiny` section's)."""
    return f"{seconds:.1f} s" if seconds < 10 else _clock(seconds)


def _clock(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"


def compared(planned: dict[str, float], measured: dict[str, float]) -> list[dict]:
    """Rows of planned against measured seconds per section (those both have) and the total."""
    rows = [{"section": k, "planned_s": planned[k], "measured_s": round(measured[k], 1),
             "ratio": round(measured[k] / planned[k], 2) if planned[k] else None}
            for k in planned if k in measured]
    p, m = sum(r["planned_s"] for r in rows), sum(r["measured_s"] for r in rows)
    return rows + [{"section": "total", "planned_s": round(p, 2), "measured_s": round(m, 1),
                    "ratio": round(m / p, 2) if p else None}]


def training_steps(lengths: Sequence[int], answers: Sequence[int], tcfg, steps: int,
                   processes: int = 1) -> list[tuple[list[tuple[int, int]], int]]:
    """The first process's share of each of `steps` optimizer steps, drawn as training draws them (the trainer's own
    `batches.GlobalBatches`: global batches of train.batch_size x processes rows, train.grad_accum per step): its
    micro-batches as (rows, padded length) and their answer tokens."""
    if len(lengths) < tcfg.batch_size * processes:
        return []
    draw, out = GlobalBatches(len(lengths), tcfg.batch_size * processes, tcfg.seed), []
    for step in range(steps):
        micro, tokens = [], 0
        for i in range(tcfg.grad_accum):
            rows = draw[step * tcfg.grad_accum + i][:tcfg.batch_size]
            micro.append((len(rows), max(lengths[r] for r in rows)))
            tokens += sum(answers[r] for r in rows)
        out.append((micro, tokens))
    return out


def _prompts(rows: Sequence[int], answers: Sequence[int]) -> list[int]:
    """Each row's prompt tokens: the row less its answer (at least one)."""
    return [max(1, n - a) for n, a in zip(rows, answers)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(1, len(values))


@dataclass(frozen=True)
class _Run:
    """What every stage's estimate needs: the config, shapes, lengths, a `Coster`, the weights' bytes."""

    cfg: object
    teacher: ModelShape
    student: ModelShape
    lengths: Lengths
    cost: Coster
    teacher_bytes: float
    student_bytes: float
    dequantize: float = 0.0  # seconds of the embedded teacher's first dequantization (0: done before, or none)

    @property
    def prompts(self) -> list[int]:
        return _prompts(self.lengths.eval, self.lengths.eval_answers)

    def evaluation(self, shape: ModelShape, weight_bytes: float, agreement: bool, speed: bool = True,
                   scored: bool = False, shared_teacher: bool = False) -> float:
        """One results row (`evaluate.evaluate_model`): perplexity (unless `scored`: the training's last held-out
        score is reused), GSM generation, agreement (the teacher's pass not counted when `shared_teacher`: one pass
        serves every trained student), efficiency (`speed`: measured, not reused from the same architecture)."""
        ev, lengths, cost = self.cfg.eval, self.lengths, self.cost
        held = batched(lengths.eval, ev.batch_size, by_length=True)
        seconds = 0.0 if scored else cost.forward(shape, held, sum(lengths.eval_answers))
        questions = min(ev.generate_samples, len(lengths.eval)) if self.cfg.data.source != "teacher_text" else 0
        if questions:
            # a batch decodes until its last row stops: one rambling answer in it (an untrained student's, or a
            # small model's loop) keeps it to the budget, as it does on the presets' data
            steps = ev.max_new_tokens
            rows = ev.generate_batch_size or ev.batch_size
            seconds += cost.decode(shape, batched(sorted(self.prompts[:questions]), rows), steps, weight_bytes)
        seconds += self.mmlu(shape)
        if agreement:
            seconds += 0.0 if shared_teacher else cost.forward(self.teacher, held, sum(lengths.eval_answers))
            seconds += cost.forward(shape, held, sum(lengths.eval_answers))
        if ev.efficiency and speed:  # a short warm-up and two timed runs of 32 tokens, at batch 1 and 16
            seconds += sum(cost.decode(shape, [(rows, 12)], tokens, weight_bytes)
                           for rows in (1, 16) for tokens in (WARMUP_TOKENS, 32, 32))
        return seconds

    @property
    def train_prompts(self) -> list[int]:
        return _prompts(self.lengths.train, self.lengths.train_answers)

    def rollout_step(self, micro: Sequence[tuple[int, int]]) -> float:
        """An on-policy step over micro-batches of (rows, padded prompt length): the student samples each rollout
        (up to train.rollout_max_new_tokens), the live teacher scores it, the student trains on it."""
        tr, cost, new = self.cfg.train, self.cost, self.cfg.train.rollout_max_new_tokens
        seconds = 0.0
        for rows, prompt in micro:
            seconds += cost.decode(self.student, [(rows, prompt)], new, self.student_bytes, sampled=True)
            seconds += cost.forward(self.teacher, [(rows, prompt + new)], rows * new)
        return seconds + cost.train_step(self.student, [(r, p + new) for r, p in micro],
                                         sum(r for r, _ in micro) * new, tr.gradient_checkpointing)

    def mmlu(self, shape: ModelShape) -> float:
        """A results row's MMLU (`evaluate.mmlu_scores`): the letter format, one forward per question, the output
        layer at its last position; the cloze format, a forward per (question, choice), the output layer on the
        choice's tokens; auto is both under 1B parameters."""
        ev = self.cfg.eval
        n = self.lengths.mmlu if self.lengths.mmlu is not None else mmlu_questions(ev)
        if not n:
            return 0.0
        formats, seconds = mmlu_formats(ev, shape.params), 0.0
        if "letter" in formats:  # batched by length, as evaluate does
            rows = [MMLU_LETTER[i % 10] + ev.mmlu_shots * MMLU_LETTER_SHOT for i in range(n)]
            seconds += self.cost.forward(shape, batched(rows, ev.batch_size, by_length=True), n)
        if "cloze" in formats:
            rows = [MMLU_CLOZE[i % 10] + ev.mmlu_shots * MMLU_CLOZE_SHOT for i in range(4 * n)]
            seconds += self.cost.forward(shape, batched(rows, ev.batch_size, by_length=True), 4 * n * MMLU_CHOICE)
        return MMLU_OVERHEAD * seconds

    def kept_teacher(self) -> float:
        """The teacher's logits on the held-out answers rebuilt from its hidden states kept by section 5's pass
        (`batches.AnswerHidden`): its output layer alone."""
        return self.cost.output(self.teacher, sum(self.lengths.eval_answers))

    def training(self, steps: int, live_teacher: bool, held_out_scores: int, checkpoints: int,
                 processes: int = 1, on_policy: float = 0.0) -> float:
        """One process's training: each process takes train.batch_size rows of every global batch (the global
        batch grows with the processes; the steps do not shrink). `on_policy`: that share of the steps trains on
        the student's rollouts (`batches.on_policy_step`, `rollout_step`)."""
        tr, cost, lengths = self.cfg.train, self.cost, self.lengths
        seconds = 0.0
        draws = training_steps(lengths.train, lengths.train_answers, tr, steps, processes)
        prompts = training_steps(self.train_prompts, self.train_prompts, tr, steps, processes) if on_policy else []
        for step, (micro, answers) in enumerate(draws):
            if on_policy and on_policy_step(step, on_policy):
                seconds += self.rollout_step(prompts[step][0])
                continue
            seconds += cost.train_step(self.student, micro, answers, tr.gradient_checkpointing)
            if live_teacher:
                seconds += cost.forward(self.teacher, micro, answers)
        held = batched(lengths.eval, self.cfg.eval.batch_size, by_length=True)
        seconds += held_out_scores * cost.forward(self.student, held, sum(lengths.eval_answers))
        return seconds + checkpoints * 16 * self.student.params / DISK_BYTES_PER_S


def time_plan(cfg, gpu: Optional[str] = None, *, lengths: Optional[Lengths] = None,
              throughput: Optional[Throughput] = None, processes: int = 1) -> TimePlan:
    """The time plan of `cfg` on `gpu` (a `plan.GPUS` name, "cpu", or None for this machine), per notebook section.

    `lengths`: the tokenized splits' (`Lengths.of`); without them the data source's typical lengths. `throughput`:
    the device's figures (default: probed on this machine and cached, or the named GPU's public figures).
    `processes`: the data-parallel processes of `accelerate launch` / torchrun (the cache's rows are shared among
    them; each training step gives each process train.batch_size rows of a global batch that grows with them, so
    the steps take as long; evaluation runs on process 0)."""
    device = get_device(gpu)
    cpu = not device.cuda
    if throughput is None:
        throughput = gpu_throughput(gpu) if gpu not in (None, "cpu") else local_throughput(gpu)
    teacher, student = _shapes(cfg)
    dequantize = _first_dequantization(cfg, teacher, throughput if cpu else None, gpu not in (None, "cpu"))
    processes = max(1, processes)
    notes = []
    if cpu and processes > 1:
        throughput, note = shared_cores(throughput, processes)
        notes += [note] if note else []
    precision = cfg.teacher.precision if cfg.teacher.precision != "auto" else ("fp32" if cpu else "8bit")
    run = _Run(cfg, teacher, student, lengths or Lengths.guess(cfg), Coster(throughput, cpu),
               teacher.params * dtype_bytes(precision), student.params * (4 if cpu else 2), dequantize)
    stages, step = _stages(run, processes)
    notes += [] if not run.lengths.typical else [
        "the data are not tokenized yet: typical lengths of the source; the plan is made again with the real ones"]
    return TimePlan(throughput, stages, run.lengths.typical, processes, notes, step)


def shared_cores(throughput: Throughput, processes: int) -> tuple[Throughput, str]:
    """A CPU's throughput per process when `processes` processes, each with this process's torch threads, share its
    cores (`usable_cores`): every rate times cores / (processes x threads) when that is under 1 (two processes of
    two threads on two cores each get half; torchrun's one thread per process on two cores, the whole), and a note
    saying so ("" when the cores suffice)."""
    threads, cores = _threads(), usable_cores()  # torch's threads, at most the cores (a container's quota)
    share = min(1.0, cores / (processes * threads))
    if share >= 1.0:
        return throughput, ""
    scaled = replace(throughput, flops=throughput.flops * share, bandwidth=throughput.bandwidth * share,
                     weight_stream=throughput.stream * share, elementwise=throughput.softmax * share,
                     stream_rows=tuple((r, v * share) for r, v in throughput.stream_rows),
                     sampling=throughput.sample_rate * share)
    return scaled, (f"{processes} processes of {threads:g} torch threads share {cores:g} cores: each at {share:.0%} "
                    f"of the probed rates")


def _stages(run: _Run, processes: int) -> tuple[list[StagePlan], float]:
    """The sections' plans, and the seconds of one distillation step."""
    cfg, cost, lengths, teacher, student = run.cfg, run.cost, run.lengths, run.teacher, run.student
    tr, ev, tc = cfg.train, cfg.eval, cfg.teacher_cache
    load = 1 + run.teacher_bytes / LOAD_BYTES_PER_S
    out = [StagePlan("3. Teacher", load + run.dequantize,
                     "dequantize the GGUF once, then load the weights" if run.dequantize else "load the weights")]
    if cfg.data.source == "teacher_text" or cfg.data.targets != "reference":
        g = cfg.generate
        n = g.num_samples if cfg.data.source == "teacher_text" else len(lengths.train)
        prompt = TYPICAL["teacher_text"][2] if cfg.data.source == "teacher_text" else int(_mean(run.prompts))
        seconds = cost.decode(teacher, batched([prompt] * n, g.batch_size), g.max_new_tokens, run.teacher_bytes,
                              sampled=g.temperature > 0)
        out.append(StagePlan("3b. Teacher answers", seconds, f"{n} answers of up to {g.max_new_tokens} tokens, "
                                                             f"batches of {g.batch_size}"))
    out.append(_student_stage(run))
    if tc.use:
        seconds = cost.forward(teacher, batched(lengths.train, tc.batch_size), sum(lengths.train_answers))
        fidelity = sum(lengths.train_answers[:FIDELITY_ROWS])  # KL and the objectives at several temperatures
        # each process runs the teacher over its share; the fidelity rows, the first ones, are process 0's alone
        seconds = seconds / processes + FIDELITY_PASSES * fidelity * teacher.vocab / cost.t.softmax
        out.append(StagePlan("4b. Teacher cache", seconds,
                             f"the teacher over {len(lengths.train):,} rows, {sum(lengths.train_answers):,} answer tokens"
                             + (f", shared by {processes} processes" if processes > 1 else "")))
    before = run.evaluation(teacher, run.teacher_bytes, False)
    # one pass of the teacher and the untrained student scores both perplexities and the agreement
    # (evaluate.agreements), and keeps the teacher's held-out hidden states for the later stages (`kept`)
    agree = kept = ev.agreement and teacher.vocab == student.vocab  # agreement needs a shared vocabulary
    before += run.evaluation(student, run.student_bytes, agree, scored=kept, shared_teacher=True)
    out.append(StagePlan("5. Before training", before, "teacher and untrained student: perplexity, generation, "
                                                       "agreement, speed"))
    rows, steps = min(8, len(lengths.eval)), min(64, ev.max_new_tokens)  # as Experiment.preflight samples
    batch = batched(run.prompts[:rows], ev.batch_size)
    rollouts = [(r, p + steps) for r, p in batch]
    seconds = cost.decode(student, batch, steps, run.student_bytes, sampled=True)
    seconds += sum(cost.forward(m, rollouts, rows * steps) for m in (teacher, student))
    out.append(StagePlan("5b. Preflight", seconds, f"{rows} samples of {steps} tokens scored by both"))
    live = not tc.use
    evals = (tr.max_steps // tr.eval_every + (tr.max_steps % tr.eval_every > 0)) if tr.eval_every else 0
    checkpoints = (tr.max_steps // tr.checkpoint_every if tr.checkpoint_every else 0) + tr.save_final
    distil = run.training(tr.max_steps, live, evals, checkpoints, processes, tr.on_policy)
    step = run.training(tr.max_steps, live, 0, 0, processes, tr.on_policy) / max(1, tr.max_steps)
    if evals and tc.use:  # the held-out split's own cache, built once (from the kept hidden states)
        distil += run.kept_teacher() if kept else cost.forward(teacher, batched(lengths.eval, tc.batch_size),
                                                                sum(lengths.eval_answers))
    per_process = f" per process ({processes} in all)" if processes > 1 else ""
    held_out = f", held-out scores x{evals}" if evals else ""
    on_policy = f" ({tr.on_policy:.0%} on-policy)" if tr.on_policy else ""
    out.append(StagePlan("6. Distillation", distil,
                         f"{tr.max_steps} steps{on_policy} of {tr.batch_size * tr.grad_accum} rows{per_process}"
                         f"{held_out}; ~{step:.2f} s a step: a checkpoint every {checkpoint_every(step)} steps loses "
                         f"at most 10 minutes"))
    if ev.baseline:
        out.append(StagePlan("6b. Baseline", run.training(tr.max_steps, False, evals, checkpoints, processes),
                             f"plain fine-tuning, {tr.max_steps} steps"))
    if ev.on_policy_preview:
        out.append(StagePlan("6c. On-policy preview", _preview(run, ev.on_policy_preview),
                             f"{ev.on_policy_preview} on-policy steps"))
    trained = 2 if ev.baseline else 1
    scored = bool(tr.eval_every) or agree  # the training's last held-out score, else the agreement pass's: reused
    after = trained * run.evaluation(student, run.student_bytes, agree, False, scored, True)
    if agree:  # one pass for both students' agreement: the teacher's logits from its kept hidden states
        after += run.kept_teacher()
    out.append(StagePlan("7. Evaluation after", after, "the distilled student" + (" and the baseline"
                                                                                 if ev.baseline else "")))
    return out, step


def checkpoint_every(step_seconds: float, minutes: float = 10.0) -> int:
    """Steps between checkpoints (train.checkpoint_every) so that a disconnect loses at most `minutes` of
    training, at `step_seconds` a step."""
    return max(1, int(minutes * 60 / max(step_seconds, 1e-6)))


def _student_stage(run: _Run) -> StagePlan:
    """Build the student (and tokenize): importance-based choices first run the teacher over the calibration rows
    (`students.load_student`: block influence when layers are chosen by importance, activation importance when
    pruning), one forward each, batches of 8, the output layer at one position."""
    s, seconds = run.cfg.student, 1 + run.student_bytes / LOAD_BYTES_PER_S
    passes = 0
    if s.source == "derive" and s.layers is None and s.layer_selection == "importance":
        passes = 1
    elif s.source == "config" and s.init == "prune":
        passes = 1 + (s.layer_selection == "importance")
    if not passes:
        return StagePlan("4. Student and tokenization", seconds, "build, tokenize")
    rows = [min(n, 256) for n in run.lengths.train[:s.calibration_rows]]
    seconds += passes * run.cost.forward(run.teacher, batched(rows, 8), len(rows))
    return StagePlan("4. Student and tokenization", seconds,
                     f"the teacher over {len(rows)} calibration rows x{passes} (importance), build, tokenize")


def _first_dequantization(cfg, teacher: ModelShape, host: Optional[Throughput], elsewhere: bool) -> float:
    """Seconds of the embedded teacher's first dequantization: none for another teacher or when this machine did it
    before (a plan for a named GPU, `elsewhere`, is for a machine that has not); at the `host` CPU's probed rate
    (the whole CPU: one process converts), or a 2-core Xeon's on a GPU machine, whose CPU is not probed."""
    if cfg.teacher.source != "embedded" or (not elsewhere and _dequantized_already()):
        return 0.0
    if host is None:
        return teacher.params / DEQUANTIZE_HOST_PARAMS_PER_S
    return teacher.params * DEQUANTIZE_PASSES / host.softmax


def _dequantized_already() -> bool:
    """Whether the embedded teacher's GGUF was dequantized on this machine before (`models.materialize_gguf`)."""
    try:
        gguf = embedded_gguf_path()
    except Exception:  # the package is missing: loading will say so; the plan assumes nothing to do
        return True
    return any((folder / ".complete").is_file() for folder in cache_root().glob(f"{gguf.stem}-*"))


def _preview(run: _Run, steps: int) -> float:
    """On-policy steps (`_Run.rollout_step`) and a held-out score."""
    prompts = run.train_prompts
    seconds = sum(run.rollout_step(micro) for micro, _ in training_steps(prompts, prompts, run.cfg.train, steps))
    held = batched(run.lengths.eval, run.cfg.eval.batch_size, by_length=True)
    return seconds + run.cost.forward(run.student, held, sum(run.lengths.eval_answers))
