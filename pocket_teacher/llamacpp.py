"""llama.cpp's Python binding (llama-cpp-python), loaded as this project's checks need it.

No torch here: `benchmarks/gguf_runtime.py` loads this file alone in its llama.cpp child process, whose peak memory
must be llama.cpp's own.

llama.cpp moves quantized weights into "extra buffer types" on load: AMX tiles on CPUs that have AMX, repacked
interleaved layouts elsewhere. On CPUs with AMX its AMX matmul can segfault (ggml-org/llama.cpp#20824, closed
unfixed; other projects turned the AMX variant off); here every quantized file crashed in the first decode on a
2-core Xeon VM with AMX, the embedded teacher's own Q4_1 file too, and loaded fine with the extra buffers off. So
they are off where the CPU has AMX, on elsewhere; POCKET_TEACHER_LLAMA_EXTRA_BUFFERS=0/1 decides instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ENV = "POCKET_TEACHER_LLAMA_EXTRA_BUFFERS"


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises AMX (the `amx_int8` or `amx_tile` flag of /proc/cpuinfo; False where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "amx_int8" in flags or "amx_tile" in flags


def extra_buffers_default() -> bool:
    """Whether llama.cpp may use its extra buffer types here: ENV when set to 0 or 1, else off on an AMX CPU."""
    value = os.environ.get(ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ValueError(f"{ENV}={value!r}: set it to 1 (llama.cpp's extra buffer types on) or 0 (off), or unset it")
    return not cpu_has_amx()


@contextlib.contextmanager
def model_params(extra_buffers: bool):
    """While inside, llama-cpp-python's default model parameters have `use_extra_bufts` as asked (the binding's
    `Llama` takes no argument for it, and reads these defaults when it loads a file)."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params
    if extra_buffers:
        yield
        return
    if not any(name == "use_extra_bufts" for name, *_ in lib.llama_model_params._fields_):
        raise RuntimeError(f"This llama-cpp-python cannot turn llama.cpp's extra buffer types off (its model "
                           f"parameters have no use_extra_bufts), and on this CPU (AMX) llama.cpp's AMX kernels can "
                           f"crash: install the pinned binding (make llama-cpp), or set {ENV}=1 to try anyway.")

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def load(path: str | Path, extra_buffers: bool | None = None, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with llama.cpp's extra buffer types as `extra_buffers` says
    (None: `extra_buffers_default()`)."""
    from llama_cpp import Llama

    with model_params(extra_buffers_default() if extra_buffers is None else extra_buffers):
        return Llama(model_path=str(path), **kwargs)
