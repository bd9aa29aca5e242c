"""Small helpers shared by the stages that write to disk: checksums and fingerprints, atomic JSON, free space."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Type


def file_hash(path: Path) -> str:
    """blake2b (128-bit) of a file's bytes, read block by block: the checksum of checkpoints and caches."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def digest(*chunks: bytes) -> str:
    """blake2b (128-bit) of the chunks, in order."""
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen model -> (its tensors' state, digest)


def model_digest(model, sample: int = 4096) -> str:
    """A fingerprint of a model's weights: every tensor's name, shape and dtype, two integer sums of its bit patterns
    (plain and position-weighted: any changed weight moves them) and the exact bytes of a strided sample. Integer
    sums are exact, so the digest is the same on any device and thread count (float sums are not: their last digits
    depend on how the work is split).

    A frozen model's digest (no parameter requires grad: a teacher) is kept while its tensors stay where they were,
    with the same version counters and the same strided samples: a run asks for its teacher's digest once per cache,
    and reading 135M weights takes a second or two on a CPU. The samples are compared because writes through
    `.data` and fused optimizers leave the version counter alone; a trainable model is always read again."""
    state = model.state_dict()
    picked = {name: _sample(t, sample) for name, t in state.items()}
    frozen = not any(p.requires_grad for p in model.parameters())
    try:  # the module's own tensors (a state_dict may build some afresh each call: bitsandbytes' 8-bit layers do)
        held = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        seen = (tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
                      for name, t in held), digest(*(p.numpy().tobytes() for p in picked.values())))
        known = _DIGESTS.get(model) if frozen else None
    except (RuntimeError, TypeError):  # inference-mode tensors have no version counter; a model weakref can't hold
        seen, known = None, None
    if known is not None and known[0] == seen:
        return known[1]
    value = _digest_of(model, state, picked)
    if seen is not None and frozen:
        try:
            _DIGESTS[model] = (seen, value)
        except TypeError:
            pass
    return value


def _sample(tensor, sample: int):
    """`sample` elements of `tensor`, evenly strided, as bytes on the host (uint8)."""
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    step = max(1, flat.numel() // sample)
    return flat[::step][:sample].contiguous().cpu().view(torch.uint8)


def _digest_of(model, state: dict, picked: dict) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        bits = flat.view(as_int[flat.element_size()]) if flat.is_floating_point() else flat
        # A block at a time in int64: an int64 copy of a large embedding at once would take 8 bytes per weight.
        acc = torch.zeros(2, dtype=torch.int64, device=flat.device)
        for start in range(0, bits.numel(), 1 << 20):
            block = bits[start:start + (1 << 20)].long()
            where = torch.arange(start, start + block.numel(), device=block.device) % 8191 + 1
            acc += torch.stack([block.sum(), (block * where).sum()])
        sums = acc.tolist()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{sums[0]}|{sums[1]}|".encode())
        h.update(picked[name].numpy().tobytes())
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    """The name of a cache entry: a digest of everything its content depends on (JSON, keys sorted)."""
    return digest(json.dumps(parts, sort_keys=True, default=str).encode())


def proc_value(path: str, key: str) -> str | None:
    """The value of the first line of a /proc file (Linux) that starts with `key`, e.g. MemTotal:; else None."""
    try:
        with open(path) as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(key)), None)
    except OSError:
        return None


@contextlib.contextmanager
def replacing(path: Path, need: int, after: str = ""):
    """Yield a unique temporary path beside `path` (same suffix) to write; when the block ends it is renamed onto
    `path`. A failed write (a full disk) removes it, leaves `path` as it was and raises `write_failure`'s OSError
    (`need`: the bytes the write needed, `after`: what is intact and how to go on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_failure(path, need, exc, after) from exc
    except BaseException:  # any other failure (or an interrupt) leaves no temporary behind either
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, after: str = "") -> Path:
    """Write text atomically (`replacing`), creating the folder if needed."""
    data = text.encode()
    with replacing(path, len(data), after) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (`replacing`; not through write_text, which would nest one frame deeper)."""
    text = json.dumps(data, indent=2, default=str).encode()
    with replacing(path, len(text)) as tmp:
        tmp.write_bytes(text)
    return Path(path)


def write_failure(path: Path, need: int, exc: OSError, after: str = "") -> OSError:
    """The OSError of a write that failed: the path, the bytes it needed and had, the cause, then `after` (what is
    intact and how to go on; by default: the file was left as it was)."""
    where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    after = after or f"{Path(path).name} was left as it was; free space there and run it again."
    error = OSError(f"Could not write {path}: {exc.strerror or exc} ({need / 2**20:,.1f} MiB needed, "
                    f"{free / 2**20:,.1f} MiB free there). {after}")
    error.errno = exc.errno  # one message, without the "[Errno 28]" prefix of OSError(errno, text)
    return error


def require_free_space(folder: Path, need: int, what: str, fix: str, error: Type[Exception] = OSError) -> None:
    """Raise `error` naming both sizes and the fix unless `folder`'s file system has `need` bytes free (the caller's
    `need` includes any margin: the message states the figure compared)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise error(f"Not enough free space for {what} in {folder}: {need / 2**20:,.1f} MiB needed, "
                    f"{free / 2**20:,.1f} MiB free. {fix}")
