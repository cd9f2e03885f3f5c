"""Triton's once-per-process hashing of itself, done once and early: at Triton's import on a background
thread where a GPU driver is visible, and waited for (never repeated) by the kernel warm-up."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from unsloth_patch import hooks, warmup
from unsloth_patch import compile_key
from unsloth_patch.settings import Settings


@pytest.fixture
def fake_triton_key(monkeypatch):
    """A stand-in for Triton's ``triton_key`` that takes a while and counts its calls."""
    calls = []
    release = threading.Event()

    def triton_key():
        calls.append(threading.current_thread().name)
        release.wait(5)
        return "3.x-abc"

    module = types.ModuleType("fake_triton_cache")
    module.triton_key = triton_key
    monkeypatch.setitem(sys.modules, "fake_triton_cache", module)
    monkeypatch.setattr(compile_key, "_KEY_MODULES", ("fake_triton_cache",))
    monkeypatch.setattr(compile_key, "_done", {})
    monkeypatch.setattr(compile_key, "walk_imports_nothing", lambda modules=None: True)
    return calls, release


def test_the_key_is_computed_once_and_a_second_caller_waits_for_the_first(fake_triton_key):
    calls, release = fake_triton_key
    thread = compile_key.prime_in_background("at Triton's import")
    assert thread is not None
    while not calls:
        time.sleep(0.01)
    assert compile_key.primed() is None  # still hashing
    waited = []
    second = threading.Thread(target=lambda: waited.append(compile_key.prime("in the warm-up")))
    second.start()
    time.sleep(0.1)
    assert second.is_alive()  # blocked on the first call, not hashing again
    release.set()
    thread.join(5)
    second.join(5)
    assert calls == ["unsloth_patch-triton-key"]
    assert waited[0]["where"] == "at Triton's import" and waited[0]["error"] is None and waited[0]["seconds"] >= 0.1
    assert compile_key.prime("again") == waited[0]


def test_nothing_is_done_without_an_imported_triton(monkeypatch):
    monkeypatch.setattr(compile_key, "_KEY_MODULES", ("not_imported_anywhere",))
    monkeypatch.setattr(compile_key, "_done", {})
    assert compile_key.key_function() is None
    assert compile_key.prime_in_background("at Triton's import") is None
    assert compile_key.prime("in the warm-up") is None and compile_key.primed() is None


def test_a_failing_key_is_recorded_not_raised(monkeypatch):
    def broken():
        raise OSError("libtriton.so: no such file")

    module = types.ModuleType("broken_triton_cache")
    module.triton_key = broken
    monkeypatch.setitem(sys.modules, "broken_triton_cache", module)
    monkeypatch.setattr(compile_key, "_KEY_MODULES", ("broken_triton_cache",))
    monkeypatch.setattr(compile_key, "_done", {})
    assert compile_key.prime("in the warm-up")["error"] == "OSError: libtriton.so: no such file"


def test_the_real_triton_has_the_function_we_call():
    triton = pytest.importorskip("triton")
    import triton.compiler.compiler  # noqa: F401  (either module may hold it, by version)
    import triton.runtime.cache  # noqa: F401

    function = compile_key.key_function()
    assert callable(function), f"Triton {triton.__version__} moved triton_key out of {compile_key._KEY_MODULES}"


def test_a_gpu_driver_is_judged_from_the_file_system_and_the_environment():
    nvidia = {"/proc/driver/nvidia/version"}.__contains__
    assert warmup.gpu_driver_visible({}, nvidia)
    assert warmup.gpu_driver_visible({}, {"/dev/kfd"}.__contains__)  # ROCm
    assert not warmup.gpu_driver_visible({}, lambda path: False)
    assert not warmup.gpu_driver_visible({"CUDA_VISIBLE_DEVICES": ""}, nvidia)
    assert not warmup.gpu_driver_visible({"CUDA_VISIBLE_DEVICES": "-1"}, nvidia)
    assert warmup.gpu_driver_visible({"CUDA_VISIBLE_DEVICES": "1"}, nvidia)
    assert not warmup.gpu_driver_visible({"TRITON_INTERPRET": "1"}, nvidia)


def test_the_background_thread_starts_only_when_the_walk_imports_nothing(monkeypatch, fake_triton_key, tmp_path):
    calls, release = fake_triton_key
    monkeypatch.setattr(compile_key, "walk_imports_nothing", lambda modules=None: False)
    assert compile_key.prime_in_background("at Triton's import") is None and not calls
    monkeypatch.undo()
    # a Triton laid out as 3.x is: the key function walks compiler/, backends/ and language/
    root = tmp_path / "triton"
    for package in ("compiler", "backends/nvidia", "backends/amd", "language/extra/cuda"):
        (root / package).mkdir(parents=True, exist_ok=True)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").write_text("")
    imported = {"triton": types.SimpleNamespace(__file__=str(root / "__init__.py"))}
    imported.update({name: object() for name in ("triton.backends.nvidia", "triton.backends.amd",
                                                 "triton.language.extra")})
    assert not compile_key.walk_imports_nothing(imported)  # triton.language.extra.cuda would be imported
    imported["triton.language.extra.cuda"] = object()
    assert compile_key.walk_imports_nothing(imported)
    assert not compile_key.walk_imports_nothing({})  # no Triton at all
    (root / "language" / "__init__.py").unlink()
    (root / "language").rename(root / "lang")
    assert not compile_key.walk_imports_nothing(imported)  # a layout this check does not know


def test_the_installed_triton_needs_no_import_to_walk_once_imported():
    pytest.importorskip("triton")
    assert compile_key.walk_imports_nothing()


def test_tritons_import_starts_the_hashing_only_where_kernels_would_compile(monkeypatch, fake_triton_key):
    calls, release = fake_triton_key
    release.set()
    monkeypatch.setattr(warmup, "gpu_driver_visible", lambda environ, exists: False)
    assert warmup.on_triton_import() is False and not calls  # no GPU driver
    monkeypatch.setattr(warmup, "gpu_driver_visible", lambda environ, exists: True)
    monkeypatch.setattr("unsloth_patch.settings.current", lambda: Settings(kernels="off", attention="off"))
    assert warmup.on_triton_import() is False and not calls  # nothing of ours compiles
    monkeypatch.setattr("unsloth_patch.settings.current", lambda: Settings())
    assert warmup.on_triton_import() is True
    for _ in range(500):
        if compile_key.primed():
            break
        time.sleep(0.01)
    assert calls == ["unsloth_patch-triton-key"] and compile_key.primed()["where"] == "at Triton's import"


def test_the_hook_is_registered_for_tritons_import_beside_the_patches_hooks():
    from unsloth_patch import registry

    assert ("triton", warmup.on_triton_import) in hooks._registered
    assert (registry.TRL_MODULE, registry.on_import) in hooks._registered


def test_the_warm_up_waits_for_the_key_and_says_so(monkeypatch, fake_triton_key):
    import contextlib

    import torch

    from unsloth_patch.kernels import warmup as kw

    calls, release = fake_triton_key
    launched = []
    monkeypatch.setattr(kw, "warm_up", lambda specs, device: launched.append(compile_key.primed()) or [])
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(warmup, "_outcome", {})
    background = compile_key.prime_in_background("at Triton's import")
    while not calls:
        time.sleep(0.01)
    threading.Timer(0.2, release.set).start()
    warmup._run([], torch.device("cuda", 0))
    background.join(5)
    assert calls == ["unsloth_patch-triton-key"]  # hashed once, by the background thread
    assert launched[0]["where"] == "at Triton's import"  # the compile threads started after it finished
    key = warmup._outcome["compile_key"]
    assert key["where"] == "at Triton's import" and key["waited"] >= 0.15
    line = warmup.describe({"seconds": 2.0, "specs": 4, "failed": [],
                            "compile_key": {"seconds": 0.5, "where": "at Triton's import", "error": None, "waited": 0.125}})
    assert line == "4 variants in 2.00 s on compile threads; Triton compile key 0.50 s at Triton's import, 0.12 s waited"
    in_warm_up = warmup.describe({"seconds": 2.0, "specs": 4, "failed": [],
                                  "compile_key": {"seconds": 0.5, "where": "in the warm-up", "error": None,
                                                  "waited": 0.5}})
    assert in_warm_up == "4 variants in 2.00 s on compile threads; Triton compile key 0.50 s in the warm-up"
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    monkeypatch.setattr(warmup, "_threads", [done])
    monkeypatch.setattr(warmup, "_tasks", [])
    assert warmup.wait(timeout=5)["compile_key"]["where"] == "at Triton's import"  # train() takes the outcome
    warmup._run([], torch.device("cuda", 0))  # a second trainer's warm-up: nothing left to wait for, nothing said
    assert "compile_key" not in warmup._outcome
