"""The run folder, runs/<name>/: who holds it (a lock), what ran (the resolved config, the environment and
hardware), and what a run leaves there (results.json / results.md, generations, the student), written by the main
process of a run."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import accelerate
import torch
import transformers
from accelerate import PartialState
from filelock import FileLock, Timeout

from .config import Config
from .files import proc_value, require_free_space, write_failure, write_json, write_text
from .checkpoints import state_bytes
from .report import results_markdown
from .train import TrainResult, uniform_collapse


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def environment() -> dict[str, Any]:
    """Versions, hardware, the command and the code's commit, saved with every run (results/ quotes them)."""
    return {"command": os.environ.get("POCKET_TEACHER_COMMAND", "a Python session (notebook or import)"),
            "commit": _commit(), "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpu": _cpu_name()}


def _commit() -> Optional[str]:
    """The git commit of the package's checkout ("-dirty" with uncommitted changes); None outside a checkout."""
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        head, changes = (subprocess.run(git + args, capture_output=True, text=True, timeout=10, check=True).stdout
                         for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None
    return head.strip() + ("-dirty" if changes.strip() else "")


def _cpu_name() -> str:
    return proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def hardware_line() -> str:
    """One line naming the device the figures were measured on (printed by every benchmark)."""
    cpu = f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB); host CPU {cpu}; torch {torch.__version__}"
    return f"CPU {cpu}; torch {torch.__version__}"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder; the message names it."""


_HELD_LOCKS: dict[str, Any] = {}  # run folders this process holds (a notebook re-running its cells keeps its own)


def lock_run_folder(out: Path) -> None:
    """Hold an exclusive lock on the run folder for the rest of this process (filelock; the OS releases it when
    the process dies, so a lock left by a killed run is stale and taken over). A second run into the same folder
    is refused at once with the holder's pid, host and start time."""
    key = str(out.resolve())
    if key in _HELD_LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    holder = out / ".lock.json"
    lock = FileLock(str(out / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(holder.read_text())
            text = f"pid {who['pid']} on {who['host']}, started {who['started']}"
        except (OSError, ValueError, KeyError):
            text = "another process"
        raise RunFolderBusy(f"The run folder {out} is in use by {text}. Wait for that run to finish, or write this "
                            f"one elsewhere (--out runs/NAME or --set run.name=NAME; in the notebook, run.name=NAME in "
                            f"OVERRIDES).") from None
    with contextlib.suppress(OSError, ValueError):  # a holder left by a run that died (kill -9, a crashed kernel)
        old = json.loads(holder.read_text())
        print(f"run folder: the lock of a run that ended without releasing it (pid {old.get('pid')}) was stale; "
              f"taken over")
    write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    _HELD_LOCKS[key] = lock
    atexit.register(holder.unlink, missing_ok=True)  # a run that ends normally leaves no holder behind


def start_run(cfg: Config) -> Path:
    """Create runs/<name>/ with the resolved config and the environment, locked against a second run."""
    out = run_dir(cfg)
    lock_run_folder(out)
    cfg.to_yaml(out / "config.yaml")
    write_json(out / "environment.json", environment())
    return out


def is_main_process() -> bool:
    """True in a single process, and in process 0 of an `accelerate launch` / torchrun group."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def main_process_first():
    """Run the block in the main process first, then in the others (which then reuse its caches)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with PartialState().main_process_first() if several else contextlib.nullcontext():
        yield


SAVE_AGAIN = ("free space, then run exp.save() again in the notebook, or the same command with --resume (the "
              "trainings resume from their final checkpoints and are not repeated; the evaluation runs again).")


def save_student(out: Path, student: torch.nn.Module, tokenizer, also: int = 0) -> Path:
    """save_pretrained into out/student without ever leaving a half-written student there: the free space is checked
    first (the weights, the tokenizer and `also` bytes of results still to come), the files go to a temporary folder
    that replaces out/student only when complete, and a failed write removes the temporary folder and says what is
    still intact (the student in memory, an earlier out/student, the final checkpoint)."""
    weights = state_bytes(student.state_dict())
    need = weights + also + (32 << 20)  # tokenizer files, config and safetensors headers
    after = (f"Nothing in {out} was replaced. The trained student is still in memory (exp.trained.student) and, "
             f"with train.save_final, in the last checkpoint under {out / 'checkpoints'}: {SAVE_AGAIN}")
    require_free_space(out, need, f"the trained student and the results ({weights / 2**20:,.1f} MiB of weights)",
                       after)
    final, tmp = out / "student", out / f".student.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as exc:  # safetensors reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(final, need, exc if isinstance(exc, OSError) else OSError(28, str(exc)), after) from exc
    old = out / f".student.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_outputs(cfg: Config, student: torch.nn.Module, tokenizer, results: Sequence[dict],
                 train_result: Optional[TrainResult] = None, overrides: Sequence[str] = (),
                 preflight: Optional[dict] = None, on_policy_preview: Optional[dict] = None,
                 teacher_cache: Optional[dict] = None, data: Sequence[str] = ()) -> Path:
    """Write results.json (with per-subject MMLU, and whether the student collapsed), results.md,
    generations.jsonl (every GSM question, output, extracted and gold answer), mmlu.jsonl (every MMLU
    question's letter scores) and the student (save_pretrained) into runs/<name>/; `teacher_cache` is the cache's
    report (its fidelity at the training temperature included), `data` the data lines (what was read, kept, held
    out and skipped)."""
    out = run_dir(cfg)
    ppl = {r["model"]: r.get("perplexity") for r in results}
    if train_result is not None and train_result.collapsed is None:
        train_result.collapsed = uniform_collapse(ppl.get("student after"), len(tokenizer), ppl.get("student before"),
                                                  cfg.train)
        if train_result.collapsed:
            print(f"WARNING: the student collapsed: {train_result.collapsed}.")
    summary = [{k: v for k, v in r.items() if k not in ("generations", "mmlu_rows", "mmlu_cloze_rows")}
               for r in results]
    extra = {"train_seconds": train_result.seconds, "steps": train_result.steps,
             "collapsed": train_result.collapsed} if train_result else {}
    texts = {"results.md": results_markdown(results) + "\n"}
    for name, key in (("generations.jsonl", "generations"), ("mmlu.jsonl", "mmlu_rows"),
                      ("mmlu_cloze.jsonl", "mmlu_cloze_rows")):
        if name == "generations.jsonl" or any(r.get(key) for r in results):
            texts[name] = "".join(json.dumps({"model": r["model"], **g}) + "\n"
                                  for r in results for g in r.get(key) or [])
    texts["results.json"] = json.dumps({"preset": cfg.preset, "environment": hardware_line(), "results": summary,
                                        "train_overrides": list(overrides), "preflight": preflight,
                                        "on_policy_preview": on_policy_preview, "teacher_cache": teacher_cache,
                                        "data": list(data),
                                        **extra}, indent=2, default=str)
    save_student(out, student, tokenizer, sum(len(t.encode()) for t in texts.values()))
    for name, text in texts.items():  # results.json last: a run folder with results.json is a finished run
        write_text(out / name, text, after=f"The student is saved in {out / 'student'}; {name} and the files after it "
                                           f"are not: {SAVE_AGAIN}")
    return out
