"""Post-import hooks: patch the target modules whenever they are imported, before or after us.

Modelled on wrapt's importer: a hook fires once per module, fires at once if the module is
already imported, and never raises into the import that triggered it.
"""

from __future__ import annotations

import logging

from . import log

_registered: set = set()  # (module name, callback): each callback once per module


def register(modules, callback) -> None:
    """Call ``callback(module)`` after each of ``modules`` is imported (now, if it already is)."""
    import wrapt

    for name in modules:
        if (name, callback) in _registered:
            continue
        _registered.add((name, callback))
        try:
            wrapt.register_post_import_hook(_safe(callback), name)
        except Exception as exc:  # pragma: no cover - wrapt itself failing
            log.once(("hook-register", name), logging.WARNING,
                     "could not watch the import of %s (%s); call unsloth_patch.apply() after importing it",
                     name, exc)


def _safe(callback):
    def hook(module):
        try:
            callback(module)
        except Exception as exc:  # the user's import must never fail because of us
            log.once(("hook", getattr(module, "__name__", "?")), logging.WARNING,
                     "unsloth_patch hook failed for %s: %s", getattr(module, "__name__", module), exc)

    return hook
