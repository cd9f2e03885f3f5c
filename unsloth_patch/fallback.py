"""Run-time fallbacks: a part of ours that fails during training is switched off, once, loudly.

Every component that runs inside the training step (the collator, the attention, the fused
layers, the checkpoint functions, each kernel) asks :func:`enabled` before it runs its own
path and calls :func:`failed` when that path raised. From then on the component takes the
stock path for the rest of the process, and the user sees one warning naming what failed.
Out-of-memory errors are not ours to hide, nor is the checkpoint's signal that stops a recomputation:
callers let them propagate (:func:`propagates`).
"""

from __future__ import annotations

import logging
import threading

from . import log

_lock = threading.Lock()
_failures: dict[str, str] = {}  # component -> "ExceptionType: message"


def enabled(component: str) -> bool:
    """Whether ``component`` may still run its own path in this process."""
    return component not in _failures


def failed(component: str, exc: BaseException, fallback: str = "stock behaviour") -> None:
    """Record that ``component`` failed; warn once; it stays off for the rest of the run."""
    text = f"{type(exc).__name__}: {exc}"
    with _lock:
        first = component not in _failures
        _failures.setdefault(component, text)
    if first:
        log.logger.warning("%s failed (%s); %s for the rest of this run", component, text, fallback,
                           exc_info=log.logger.isEnabledFor(logging.DEBUG))


def failures() -> dict[str, str]:
    """Components switched off so far, with the error that did it (for the report)."""
    with _lock:
        return dict(_failures)


def is_out_of_memory(exc: BaseException) -> bool:
    """Errors a stock run would have raised too: never turned into a fallback."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except Exception:  # pragma: no cover
        return False


def propagates(exc: BaseException) -> bool:
    """Errors a fallback must let through: out of memory, and the signal with which PyTorch's non-reentrant
    checkpoint stops a recomputation once it has what the backward needs (raised from inside any op that saves)."""
    if is_out_of_memory(exc):
        return True
    try:
        from torch.utils import checkpoint

        stop = getattr(checkpoint, "_StopRecomputationError", None)
        return stop is not None and isinstance(exc, stop)
    except Exception:  # pragma: no cover
        return False


def reset(component: str | None = None) -> None:
    """Allow ``component`` (every component by default) to run its own path again (tests)."""
    with _lock:
        if component is None:
            _failures.clear()
        else:
            _failures.pop(component, None)
