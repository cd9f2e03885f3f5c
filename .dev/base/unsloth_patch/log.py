"""The plugin's logger, and a way to say a thing once per process."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("unsloth_patch")

_said: set = set()
_lock = threading.Lock()


def configure(level: str) -> None:
    """Attach a stderr handler (once) so the plugin speaks even if the user set up no logging."""
    logger.setLevel(level.upper())
    if not any(getattr(h, "_unsloth_patch", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[unsloth_patch] %(levelname)s: %(message)s"))
        handler._unsloth_patch = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def once(key: object, level: int, message: str, *args, exc_info=None) -> bool:
    """Log ``message`` the first time ``key`` is seen; return whether it was logged."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    logger.log(level, message, *args, exc_info=exc_info)
    return True


def forget() -> None:
    """Allow every once-message to be said again (used by remove() and tests)."""
    with _lock:
        _said.clear()
