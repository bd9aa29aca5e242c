"""Small file helpers shared by the stages that write to disk: checksums, atomic JSON, free space."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Type


def file_hash(path: Path) -> str:
    """blake2b (128-bit) of a file's bytes, read in 4 MiB blocks: the checksum of checkpoints and caches."""
    h = hashlib.blake2b(digest_size=16)
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (unique temp file beside it, then rename), creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)
    return path


def require_free_space(folder: Path, need: int, what: str, fix: str, error: Type[Exception] = OSError) -> None:
    """Raise `error` naming both sizes and the fix unless `folder`'s file system has `need` bytes free (+5%)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise error(f"Not enough free space for {what} in {folder}: {need / 2**20:,.1f} MiB needed, "
                    f"{free / 2**20:,.1f} MiB free. {fix}")
