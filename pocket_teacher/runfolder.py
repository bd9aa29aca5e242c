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


def join_process_group() -> None:
    """Under `accelerate launch` / torchrun, make sure the process group exists (accelerate's `PartialState`
    creates it: NCCL on GPUs, gloo on CPU), so that the processes can work on one job together."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState()


@contextlib.contextmanager
def main_process_first():
    """Run the block in the main process first, then in the others (which then reuse its caches)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with PartialState().main_process_first() if several else contextlib.nullcontext():
        yield


def save_again(cfg: Config) -> str:
    """How to finish a save that failed, as the run's settings allow."""
    kept = ("the trainings resume from their final checkpoints and are not repeated; the evaluation runs again"
            if cfg.train.save_final else "train.save_final is off, so the trainings run again")
    return (f"free space, then run exp.save() again in the notebook (the trained student is still in memory), or the "
            f"same command with --resume ({kept}).")


def save_student(out: Path, student: torch.nn.Module, tokenizer, after: str) -> Path:
    """save_pretrained into out/student without ever leaving a half-written student there: the files go to a
    temporary folder that replaces out/student only when complete; a failed write removes it and raises an
    OSError naming the folder, the space and `after`. Leftovers of an earlier save that died (kill -9) are cleared
    first, and a student moved aside but never replaced is put back."""
    final = out / "student"
    for left in sorted(out.glob(".student.old-*")):
        if not final.exists():
            os.replace(left, final)  # died between the two renames below: the earlier student comes back
        shutil.rmtree(left, ignore_errors=True)
    for left in out.glob(".student.tmp-*"):
        shutil.rmtree(left, ignore_errors=True)
    tmp, old = out / f".student.tmp-{os.getpid()}", out / f".student.old-{os.getpid()}"
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as exc:  # safetensors reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RuntimeError) and "No space" not in str(exc):
            raise
        cause = exc if isinstance(exc, OSError) else OSError(28, str(exc).splitlines()[0])
        raise write_failure(final, state_bytes(student.state_dict()), cause, after) from exc
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_outputs(cfg: Config, student: torch.nn.Module, tokenizer, results: Sequence[dict],
                 train_result: Optional[TrainResult] = None, overrides: Sequence[str] = (),
                 extra: Optional[dict] = None, files: Optional[dict[str, str]] = None) -> Path:
    """Write the student (save_pretrained), results.md, generations.jsonl (every GSM question, output, extracted and
    gold answer), mmlu.jsonl (every MMLU question's letter scores), the `files` given (name: text) and, last,
    results.json (the table, per-subject MMLU, whether the student collapsed, and `extra`: the preflight, the
    on-policy preview, the teacher cache's report, the data lines) into runs/<name>/. A folder with results.json is
    a finished save. The free space is checked first; a full disk at any write leaves the earlier files whole and
    says how to finish."""
    out = run_dir(cfg)
    ppl = {r["model"]: r.get("perplexity") for r in results}
    if train_result is not None and train_result.collapsed is None:
        train_result.collapsed = uniform_collapse(ppl.get("student after"), len(tokenizer), ppl.get("student before"),
                                                  cfg.train)
        if train_result.collapsed:
            print(f"WARNING: the student collapsed: {train_result.collapsed}.")
    summary = [{k: v for k, v in r.items() if k not in ("generations", "mmlu_rows", "mmlu_cloze_rows")}
               for r in results]
    trained = {"train_seconds": train_result.seconds, "steps": train_result.steps,
               "collapsed": train_result.collapsed} if train_result else {}
    texts = {"results.md": results_markdown(results) + "\n"}
    for name, key in (("generations.jsonl", "generations"), ("mmlu.jsonl", "mmlu_rows"),
                      ("mmlu_cloze.jsonl", "mmlu_cloze_rows")):
        if name == "generations.jsonl" or any(r.get(key) for r in results):
            texts[name] = "".join(json.dumps({"model": r["model"], **g}) + "\n"
                                  for r in results for g in r.get(key) or [])
    texts.update(files or {})
    texts["results.json"] = json.dumps({"preset": cfg.preset, "environment": hardware_line(), "results": summary,
                                        "train_overrides": list(overrides), **(extra or {}), **trained},
                                       indent=2, default=str)
    weights = state_bytes(student.state_dict())
    again = save_again(cfg)
    after = (f"Nothing in {out} was replaced. The trained student is still in memory (exp.trained.student)"
             + (f" and in the last checkpoint under {out / 'checkpoints'}" if cfg.train.save_final else "")
             + f": {again}")
    need = weights + sum(len(t.encode()) for t in texts.values()) + (32 << 20)  # tokenizer files, headers
    require_free_space(out, need, f"the trained student and the results ({weights / 2**20:,.1f} MiB of weights)",
                       after)
    (out / "results.json").unlink(missing_ok=True)  # an earlier save's: until this one ends, no finished save
    save_student(out, student, tokenizer, after)
    for name, text in texts.items():  # results.json last
        write_text(out / name, text, after=f"The student is saved in {out / 'student'}; {name} and the files after "
                                           f"it are not: {again}")
    return out
