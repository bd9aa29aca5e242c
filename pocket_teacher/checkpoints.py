"""Atomic, checksummed training checkpoints: save, find the newest valid one, prune.

A checkpoint is a folder ``checkpoint-<step>/`` under ``runs/<name>/checkpoints/`` holding the
student's weights, the optimizer state, every RNG state, and ``trainer.json`` (step,
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

from .files import file_hash, require_free_space

PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed as asked; the message says why and what to do."""


def state_bytes(*states) -> int:
    """Bytes the tensors of these (nested) state dicts take when saved (a tensor shared by two names, such as tied
    input and output embeddings, is saved and counted once)."""
    total, pending, seen = 0, list(states), set()
    while pending:  # a walk with a stack: state dicts nest (optimizer state per parameter), frames need not
        obj = pending.pop()
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel(), obj.dtype)
            total += 0 if key in seen else obj.numel() * obj.element_size()
            seen.add(key)
        elif isinstance(obj, dict):
            pending.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            pending.extend(obj)
    return total


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


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict[str, Any]) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically and return it (replacing one of that step).

    Refuses weights that are not finite (a checkpoint must always be a state worth resuming), checks the
    free space first, and on a write error (a full disk, say) removes its temporary folder and says so."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"Refusing to write checkpoint-{step:06d}: {len(bad)} of {len(state)} weight tensors "
                              f"hold NaN or infinity (first: {bad[0]}).")
    optim_state = optimizer.state_dict()
    fix = "Free space there, or lower train.keep_checkpoints / raise train.checkpoint_every."
    meta = json.dumps({"step": step, **trainer_state}, default=str)
    # the tensors, the trainer state (its history grows with the run), torch.save's framing (about 270 bytes per
    # tensor: 512 counted) and 64 KiB for the rest
    tensors = len(state) + sum(len(v) for v in optim_state.get("state", {}).values())
    need = state_bytes(state, optim_state) + len(meta.encode()) + 512 * tensors + (64 << 10)
    require_free_space(folder, need, f"checkpoint-{step:06d}", fix, CheckpointError)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, obj in (("model.pt", state), ("optimizer.pt", optim_state), ("rng.pt", rng_state())):
            torch.save(obj, tmp / name)
        (tmp / "trainer.json").write_text(meta)
        checksums = {p.name: file_hash(p) for p in sorted(tmp.iterdir())}
        (tmp / "complete.json").write_text(json.dumps({"step": step, "checksums": checksums}))
        for path in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        free = shutil.disk_usage(folder).free / 2**20
        raise CheckpointError(f"Could not write checkpoint-{step:06d} in {folder}: {reason} ({need / 2**20:,.1f} MiB "
                              f"needed, {free:,.1f} MiB free). The partial copy was removed; earlier checkpoints are "
                              f"intact. {fix}") from exc
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
    found = [p for p in folder.glob(f"{PREFIX}*") if p.is_dir()]  # none when the folder does not exist
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def newest_valid(folder: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that passes `checkpoint_problem`; torn or damaged ones are reported and skipped."""
    for path in list_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"checkpoint {path.name} skipped: {problem}")
    return None


def trainer_state(path: Path) -> dict[str, Any]:
    """The trainer.json of a checkpoint (step, run id, configuration fingerprint, history)."""
    return json.loads((path / "trainer.json").read_text())


def move_aside(folder: Path) -> Optional[Path]:
    """Move an earlier run's checkpoints out of the way (``checkpoints.previous-N``); return where they went."""
    if not list_checkpoints(folder):
        return None
    n = 1
    while (target := folder.with_name(f"{folder.name}.previous-{n}")).exists():
        n += 1
    os.replace(folder, target)
    return target


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from `path`; return its trainer state. (The learning rate is a
    function of the step, `pocket_teacher.train.lr_factor`: there is no scheduler state, and the scheduler.pt of
    older checkpoints is not read.)"""
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(path / "model.pt", map_location=device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return trainer_state(path)


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (and stale temporary folders); return what was removed."""
    removed = list_checkpoints(folder)[max(1, keep):]
    for path in removed:
        shutil.rmtree(path)
    for tmp in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed
