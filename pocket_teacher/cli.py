"""Headless entry point: ``python -m pocket_teacher {run,notebook,presets,config} ...``.

    python -m pocket_teacher run --preset pocket --set loss.alpha=0.3 --set train.max_steps=200 --out runs/a03
    python -m pocket_teacher run --preset pocket --out runs/a03 --resume      # continue a killed run
    python -m pocket_teacher plan --preset t4 --gpu t4                # memory and time per stage; exit 3 if no fit
    python -m pocket_teacher export --run runs/pocket --quant q8_0          # the student as a GGUF for llama.cpp
    python -m pocket_teacher export --run runs/pocket --quant q4_0 --heal-steps 50   # heal the q4_0 gap first
    accelerate launch --num_processes 2 -m pocket_teacher run --preset t4   # several GPUs (or CPU processes)
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from . import experiment
from .checkpoints import CheckpointError, list_checkpoints
from .config import PRESETS, ConfigError
from .data import DataError
from .export import QUANTS, ExportError
from .hub import HubUnavailableError
from .models import ModelLoadError, VocabMismatchError
from .plan import GPUS, PlanError, memory_plan
from .timeplan import local_throughput, time_plan
from .runfolder import RunFolderBusy, run_dir
from .teacher_cache import CacheError
from .train import NOTEBOOK_RESUME, TrainingDiverged, TrainingInterrupted
from .versions import VersionError

NOTEBOOK = Path(__file__).resolve().parent.parent / "Pocket_Teacher.ipynb"


def _positive(kind):
    """An argparse type: a number of `kind` above 0, else a usage error naming the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") \
                from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pocket_teacher",
                                     description="Distil a teacher LLM into a small student (notebook-first).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)  # the options every command that reads a preset takes
    common.add_argument("--preset", default="pocket", help=f"starting configuration: {', '.join(PRESETS)}")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (repeatable), e.g. --set loss.alpha=0.3")
    common.add_argument("--out", help="run folder (default runs/<preset>); sets run.out_dir/run.name")

    run = sub.add_parser("run", parents=[common], help="run the whole pipeline headless and write runs/<name>/",
                         description="Load data and models, build or reuse the teacher cache, evaluate, distil, "
                                     "evaluate again, and write runs/<name>/: config.yaml, environment.json, "
                                     "history.jsonl, results.json / results.md, generations, figures/, "
                                     "student/, checkpoints/. Under `accelerate launch` each process trains its "
                                     "shard of every global batch and only process 0 writes.")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    nb = sub.add_parser("notebook", help="execute Pocket_Teacher.ipynb (or --notebook, e.g. Pocket_Teacher_Text.ipynb) "
                                         "headless on a preset", parents=[common])
    nb.add_argument("--notebook", default=str(NOTEBOOK), help="notebook to execute")
    nb.add_argument("--executed",
                    help="where to write the executed notebook (default <run folder>/<notebook's file name>)")
    nb.add_argument("--figures", help="also save the figures here (e.g. figures/)")
    nb.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    for p in (run, nb):
        p.add_argument("--force", action="store_true",
                       help="start even when the memory plan says a stage does not fit this machine")
        p.add_argument("--resume", action="store_true",
                       help="continue from the newest valid checkpoint in <run folder>/checkpoints (same as "
                            "--set train.resume=true; torn or damaged checkpoints are skipped)")

    plan = sub.add_parser("plan", help="print the memory plan (GPU memory and host RAM per stage) and the time plan "
                                       "(seconds per section); exit 0 when it fits, 3 when it does not",
                          parents=[common],
                          description="Peak accelerator memory and host RAM of every stage (teacher cache, evaluation, "
                                      "generation, teacher answers, training), itemised, with a verdict and, when it "
                                      "does not fit, the overrides that would make it fit; then the time plan: each "
                                      "section's wall time from its FLOPs, bytes and ops and the device's throughput "
                                      "(probed here once and cached, or a named GPU's public figures). Works "
                                      "offline.")
    plan.add_argument("--gpu", choices=[*GPUS, "cpu"],
                      help="plan for this GPU (default: the GPU PyTorch sees here, else this CPU)")
    plan.add_argument("--host-gb", type=_positive(float), help="host RAM in GB (default: the GPU's usual host)")
    plan.add_argument("--processes", type=_positive(int), default=1,
                      help="data-parallel processes (accelerate launch / torchrun) the time plan shares work among")
    plan.add_argument("--probe", action="store_true",
                      help="measure this machine's throughput again (e.g. the cached probe ran on a busy machine)")

    export = sub.add_parser("export", help="write a finished run's student as a GGUF file (llama.cpp, Ollama)",
                            description="Write runs/NAME/student (or the baseline's final checkpoint) as one GGUF "
                                        "file: Llama-family and Qwen2 metadata, the tokenizer (copied from the "
                                        "teacher's GGUF when it is the same vocabulary), tensors quantized with the "
                                        "GGUF block rules.")
    export.add_argument("--run", required=True, help="a finished run folder (runs/NAME)")
    export.add_argument("--model", choices=["student", "baseline"], default="student")
    export.add_argument("--quant", choices=QUANTS, default="q8_0")
    export.add_argument("--out", help="the .gguf file (default <run>/<model>-<quant>.gguf)")
    export.add_argument("--no-equalize", dest="equalize", action="store_false",
                        help="write q8_0 / q4_0 / q4_1 weights as trained; by default the activations are equalized "
                             "(the same function, rounded more gently by llama.cpp), with scales measured on the "
                             "run's first training rows, which loads the run's data and teacher; with --heal-steps "
                             "the healing fits the equalized file's weights, and --no-equalize heals the weights as "
                             "trained (<run>/student-<quant>-healed[-alpha<a>]-unequalized.gguf)")
    export.add_argument("--embedding-type", choices=QUANTS, metavar="TYPE", help="the embedding and output layer's "
                        "type (q8_0 in a 4-bit file, as llama.cpp keeps a tied one; default the file's)")
    export.add_argument("--heal-steps", type=int, default=0, metavar="N",
                        help="first heal the quantization gap: N more distillation steps with the weights "
                             "quantized in the forward pass, from the run's teacher cache; writes "
                             "<run>/student-<quant>-healed[-alpha<a>].gguf (equalized as the export writes it) and "
                             "<run>/heal.json")
    export.add_argument("--heal-alpha", type=float, help="alpha of the healing steps (default the run's; 1 is "
                                                         "plain fine-tuning)")
    export.add_argument("--heal-lr", type=float, help="learning rate of the healing steps (default a tenth of the "
                                                      "run's train.lr)")

    sub.add_parser("presets", help="list the presets")
    sub.add_parser("config", parents=[common], help="print a preset's resolved configuration as YAML")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    if args.out:
        out = Path(args.out)
        overrides += [f"run.out_dir={out.parent.as_posix() or '.'}", f"run.name={out.name}"]
    elif not any(o.split("=", 1)[0].strip() == "run.name" for o in overrides):  # --set run.name=NAME is kept
        overrides += [f"run.name={args.preset}"]
    return overrides


def execute_notebook(notebook: str | Path, preset: str, overrides: Sequence[str], executed: str | Path,
                     timeout: int = 3600, force: bool = False, echo: bool = True) -> Path:
    """Run every cell of `notebook` in a fresh kernel with papermill, its `parameters` cell given PRESET,
    OVERRIDES, FORCE and HEADLESS=True. With `echo`, the cells' output (each section's start and end, progress
    as text lines, the tables) streams to this terminal while it runs."""
    import papermill

    Path(executed).parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(executed), kernel_name="python3", progress_bar=False, log_output=False,
        stdout_file=sys.stdout if echo else None, stderr_file=sys.stderr if echo else None,
        parameters={"PRESET": preset, "OVERRIDES": list(overrides), "FORCE": force, "HEADLESS": True},
        cwd=str(Path(notebook).resolve().parent), execution_timeout=timeout)
    return Path(executed)


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean "the input or the machine needs a change", printed as one line without a traceback."""
    return (ConfigError, PlanError, DataError, HubUnavailableError, ModelLoadError, VocabMismatchError, CacheError,
            CheckpointError, TrainingDiverged, RunFolderBusy, VersionError, ExportError)


def is_user_error(exc: BaseException) -> bool:
    """One of `user_errors`, or a ValueError, OSError or ImportError that this package raised itself (its message
    names the fix; a full disk or a missing file is an OSError at one of its own lines). The same types raised
    inside a library are programming errors until shown otherwise: they keep their traceback."""
    if isinstance(exc, user_errors()):
        return True
    if not isinstance(exc, (ValueError, OSError, ImportError)) or exc.__traceback__ is None:
        return False
    last = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)][-1]
    return Path(last.f_code.co_filename).resolve().parent == Path(__file__).resolve().parent


@contextlib.contextmanager
def _sigterm_stops(out: Path):
    """SIGTERM outside a training loop (which stops at its next step boundary by itself) ends the run in `out` with
    a message and exit 143 instead of Python's silent default; the advice depends on whether training had begun."""
    def stop(signum, frame):
        advice = (f"each training that had finished is checkpointed in {out}: continue with --resume "
                  f"({NOTEBOOK_RESUME})" if list_checkpoints(out / "checkpoints") else
                  "no training had begun: run the same command again (the caches already on disk are reused)")
        raise TrainingInterrupted(signum, f"SIGTERM outside a training loop; {advice}")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.command == "presets":
        for name, make in PRESETS.items():
            print(f"{name:8s} {(make.__doc__ or '').strip() or make().teacher.source}")
        return 0
    if args.command == "export":
        if args.heal_steps:
            if args.model != "student" or args.out:
                raise ExportError("--heal-steps heals the distilled student and writes <run>/student-<quant>-"
                                  "healed*.gguf: drop --model baseline and --out.")
            if args.embedding_type:
                raise ExportError("--embedding-type is not used by healing yet (it rounds every matrix to --quant): "
                                  "drop --embedding-type to heal, or drop --heal-steps to export with it.")
            report = experiment.heal_run(args.run, args.quant, args.heal_steps, alpha=args.heal_alpha,
                                         lr=args.heal_lr, equalize=args.equalize)
            print(f"healed: {report['gguf']}; perplexity gap {report['gap_before']:+.3f} -> "
                  f"{report['gap_after']:+.3f}")
            return 0
        print(experiment.export_from_run(args.run, args.model, args.quant, args.out, equalize=args.equalize,
                                         embedding=args.embedding_type))
        return 0
    cfg = experiment.configure(args.preset, _overrides(args))
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "plan":
        if args.probe and args.gpu not in (None, "cpu"):
            print(f"error: --probe measures this machine; --gpu {args.gpu} plans from that GPU's public figures. "
                  f"Drop --probe, or drop --gpu to plan for this machine.", file=sys.stderr)
            return 2
        plan = memory_plan(cfg, args.gpu, host_gb=args.host_gb)
        print(plan)
        throughput = local_throughput(args.gpu, refresh=True) if args.probe else None
        print(time_plan(cfg, args.gpu, throughput=throughput, processes=args.processes))
        return 0 if plan.fits else 3
    if args.command == "run":
        try:
            with _sigterm_stops(run_dir(cfg)):
                experiment.run(cfg, progress=not args.no_progress, force=args.force)
        except experiment.PlanDoesNotFit as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        return 0
    overrides = _overrides(args) + ([f"run.figures_dir={args.figures}"] if args.figures else [])
    executed = args.executed or run_dir(cfg) / Path(args.notebook).name
    start = time.perf_counter()
    path = execute_notebook(args.notebook, args.preset, overrides, executed, args.timeout, force=args.force)
    print(f"executed {args.notebook} on preset {args.preset} in {time.perf_counter() - start:.0f} s -> {path}")
    return 0

