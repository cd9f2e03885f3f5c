"""Triton's per-process compile key, computed once, early, off the main thread.

Before its first compile or on-disk cache lookup in a process, Triton hashes its own compiler
and language sources and its whole native library (``triton_key()``: about 500 MB read and
hashed, half a second on a fast core). Triton caches the result but does not lock it, so compile
threads that start together each compute it again. Here it is computed once, under a lock: a
second caller waits for the first instead of hashing too. Started on a background thread while
the user's script builds its model, it is off the start-up altogether (reading and hashing
release the GIL).

Only a Triton that is already imported is used: nothing here imports Triton. Triton's function
walks its compiler, backend and language packages (``pkgutil.walk_packages``, which imports each
subpackage it meets); on a background thread it is called only when every one of them is imported
already, so that the thread imports nothing while the main thread may be importing.
"""

from __future__ import annotations

import os
import pkgutil
import sys
import threading
import time
from typing import Optional

# where Triton keeps the function, newest first (moved from the compiler to the runtime cache)
_KEY_MODULES = ("triton.runtime.cache", "triton.compiler.compiler")

_lock = threading.Lock()
_done: dict = {}  # seconds, where, error: replaced once, whole, by the first call that computed the key


def key_function():
    """Triton's ``triton_key`` from an imported Triton; None when Triton is not imported or has none."""
    for name in _KEY_MODULES:
        function = getattr(sys.modules.get(name), "triton_key", None)
        if callable(function):
            return function
    return None


def prime(where: str) -> Optional[dict]:
    """Compute the key once per process; a call while another computes it waits for that one.

    Returns what the computing call recorded (``seconds``, ``where``, ``error``), or None when no
    imported Triton has the function (nothing was done). Never raises: a failure here only means
    Triton computes the key itself, as it would have.
    """
    global _done
    with _lock:
        if _done:
            return dict(_done)
        function = key_function()
        if function is None:
            return None
        started = time.perf_counter()
        error = None
        try:
            function()
        except Exception as exc:  # Triton will meet the same error at its first compile and report it
            error = f"{type(exc).__name__}: {exc}"
        _done = {"seconds": time.perf_counter() - started, "where": where, "error": error}
        return dict(_done)


# the folders of Triton that its key function walks (Triton 3.x)
_WALKED = ("compiler", "backends", "language")


def _subpackages(path: str, prefix: str):
    """Names of the packages under ``path``, found in the file system (nothing imported)."""
    for info in pkgutil.iter_modules([path], prefix):
        if info.ispkg:
            yield info.name
            yield from _subpackages(os.path.join(path, info.name.rsplit(".", 1)[-1]), info.name + ".")


def walk_imports_nothing(modules=None) -> bool:
    """Whether every package Triton's key function will walk is imported already (``modules``:
    ``sys.modules`` by default), so that calling it imports nothing."""
    modules = sys.modules if modules is None else modules
    triton = modules.get("triton")
    root = os.path.dirname(getattr(triton, "__file__", None) or "")
    if not root or not all(os.path.isdir(os.path.join(root, name)) for name in _WALKED):
        return False
    return all(package in modules for name in _WALKED
               for package in _subpackages(os.path.join(root, name), f"triton.{name}."))


def prime_in_background(where: str) -> Optional[threading.Thread]:
    """Start :func:`prime` on a daemon thread; None when no imported Triton has the function, or
    when calling it would import a module (the main thread may be importing)."""
    if key_function() is None or not walk_imports_nothing():
        return None
    thread = threading.Thread(target=prime, args=(where,), name="unsloth_patch-triton-key", daemon=True)
    thread.start()
    return thread


def primed() -> Optional[dict]:
    """What the computing call recorded, or None while it has not finished (never waits)."""
    done = _done  # replaced whole, never changed in place: no lock needed to read it
    return dict(done) if done else None
