"""pocket_teacher.llamacpp: llama.cpp's extra buffer types off where the CPU has AMX (llama.cpp#20824), without
needing llama-cpp-python (a stand-in binding)."""

import sys
import types

import pytest

from pocket_teacher import llamacpp

CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx512f {}\n"


def test_amx_is_read_from_the_cpu_flags():
    assert llamacpp.cpu_has_amx(CPUINFO.format("amx_bf16 amx_int8 amx_tile"))
    assert not llamacpp.cpu_has_amx(CPUINFO.format("avx512_vnni"))
    assert not llamacpp.cpu_has_amx("no flags line here")


def test_the_environment_decides_else_amx_turns_them_off(monkeypatch):
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    for amx in (True, False):
        monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda amx=amx: amx)
        assert llamacpp.extra_buffers_default() is (not amx)
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv(llamacpp.ENV, value)
        assert llamacpp.extra_buffers_default() is want
    monkeypatch.setenv(llamacpp.ENV, "off")
    with pytest.raises(ValueError, match="POCKET_TEACHER_LLAMA_EXTRA_BUFFERS='off': set it to 1 .* or 0"):
        llamacpp.extra_buffers_default()


class _Params:
    _fields_ = (("n_gpu_layers", int), ("use_extra_bufts", bool))

    def __init__(self):
        self.use_extra_bufts = True


def test_the_binding_loads_with_extra_buffers_off_only_when_asked(monkeypatch):
    lib = types.ModuleType("llama_cpp.llama_cpp")
    lib.llama_model_params = _Params
    lib.llama_model_default_params = _Params
    seen = []

    class Llama:  # the binding reads the module's default parameters while it loads the file
        def __init__(self, model_path, **kwargs):
            seen.append((model_path, kwargs, lib.llama_model_default_params().use_extra_bufts))

    package = types.ModuleType("llama_cpp")
    package.Llama, package.llama_cpp = Llama, lib
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", lib)
    llamacpp.load("a.gguf", extra_buffers=False, n_ctx=8)
    llamacpp.load("b.gguf", extra_buffers=True)
    assert seen == [("a.gguf", {"n_ctx": 8}, False), ("b.gguf", {}, True)]
    assert lib.llama_model_default_params is _Params  # restored
    monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda: True)
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    llamacpp.load("c.gguf")
    assert seen[-1][2] is False


def test_a_binding_that_cannot_turn_them_off_is_refused_with_the_fix(monkeypatch):
    lib = types.ModuleType("llama_cpp.llama_cpp")
    lib.llama_model_params = type("OldParams", (), {"_fields_": (("n_gpu_layers", int),)})
    lib.llama_model_default_params = lib.llama_model_params
    package = types.ModuleType("llama_cpp")
    package.Llama, package.llama_cpp = lambda **kwargs: kwargs, lib
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", lib)
    with pytest.raises(RuntimeError, match=r"no use_extra_bufts.*make llama-cpp.*POCKET_TEACHER_LLAMA_EXTRA_BUFFERS=1"):
        llamacpp.load("a.gguf", extra_buffers=False)
    assert llamacpp.load("a.gguf", extra_buffers=True) == {"model_path": "a.gguf"}
