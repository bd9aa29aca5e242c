"""Atomic, checksummed training checkpoints: save, find the newest valid one, prune.

A checkpoint is a folder ``checkpoint-<step>/`` under ``runs/<name>/checkpoints/`` holding the
student's weights, the optimizer and scheduler states, every RNG state, and ``trainer.json`` (step,
data position, history so far). It is written into a hidden temporary folder and renamed into place
once ``complete.json`` (the files' checksums) is written, so a checkpoint killed mid-write is never
seen; one whose files were damaged afterwards fails its checksums and is skipped, never loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .files import file_hash

PREFIX = "checkpoint-"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict[str, Any]) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically and return it (replacing one of that step)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, default=str))
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / "complete.json").write_text(json.dumps({"step": step, "checksums": {f: file_hash(tmp / f) for f in files}}))
    for path in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def checkpoint_problem(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint whose files match their checksums, else what is wrong."""
    marker = path / "complete.json"
    if not marker.is_file():
        return "no complete.json (the write did not finish)"
    try:
        sums = json.loads(marker.read_text())["checksums"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable complete.json ({exc})"
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if file_hash(f) != digest:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(folder: Path) -> list[Path]:
    """Published checkpoints, newest step first (valid or not)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def newest_valid(folder: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that passes `checkpoint_problem`; torn or damaged ones are reported and skipped."""
    for path in list_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"checkpoint {path.name} skipped: {problem}")
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states from `path`; return its trainer state."""
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(path / "model.pt", map_location=device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer.json").read_text())


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (and stale temporary folders); return what was removed."""
    removed = []
    for path in list_checkpoints(folder)[max(1, keep):]:
        shutil.rmtree(path)
        removed.append(path)
    for tmp in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed
