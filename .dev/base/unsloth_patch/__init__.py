"""unsloth_patch: faster TRL supervised fine-tuning from one line, ``import unsloth_patch``.

Importing the package reads the ``UNSLOTH_PATCH_*`` toggles and registers post-import hooks
for the modules that define our targets; it imports neither torch, transformers nor TRL.
The patches apply when those modules are imported (or at once, if they already are).
"""

from __future__ import annotations

import logging

from . import hooks, log, registry, warmup
from .registry import PatchRecord
from .settings import Settings, current, read_settings, set_current, unknown_variables

__version__ = "0.1.0"
__all__ = ["activate", "apply", "remove", "report", "last_plan", "startup_report", "current_settings", "Settings",
           "UnslothSFTConfig", "PatchRecord"]

_disabled = False


def activate() -> None:
    """Read the toggles and watch the target modules. Runs once at import."""
    global _disabled
    settings = read_settings()  # a bad toggle is the user's error: raise it here, clearly
    set_current(settings)
    log.configure(settings.log_level)
    _disabled = settings.disable
    if _disabled:
        log.logger.info("disabled by UNSLOTH_PATCH_DISABLE; nothing is patched")
        return
    for name in unknown_variables():
        log.once(("unknown", name), logging.WARNING, "ignoring unknown toggle %s (typo?)", name)
    try:
        hooks.register(registry.target_modules(), registry.on_import)
        hooks.register(["triton"], warmup.on_triton_import)  # Triton hashes itself while the script goes on
    except Exception as exc:  # never break the user's import
        log.once("activate", logging.WARNING, "unsloth_patch could not activate: %s", exc)


def current_settings() -> Settings:
    """The toggles in force."""
    return current()


def apply(names=None) -> list[PatchRecord]:
    """Apply the patches whose targets are imported (idempotent). Returns the report."""
    if _disabled:
        return report()
    return registry.apply(names)


def remove(names=None) -> None:
    """Undo the patches (all by default); the original functions are restored exactly."""
    registry.remove(names)


def report() -> list[PatchRecord]:
    """One record per patch: name, targets, toggle, supported versions, applied or not, and why."""
    records = registry.report()
    if _disabled:
        for rec in records:
            rec.applied, rec.reason = False, "plugin disabled by UNSLOTH_PATCH_DISABLE"
    return records


def last_plan():
    """The decision made for the most recent SFTTrainer (None before the first one)."""
    from .plan import last_plan as _last

    return _last()


def startup_report():
    """How long the plugin's own start-up took at the last ``train()``, by phase (None before one)."""
    from .startup import last

    return last()


def __getattr__(name):
    """Load UnslothSFTConfig (which imports TRL) only when asked for."""
    if name == "UnslothSFTConfig":
        from .config import UnslothSFTConfig

        return UnslothSFTConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


activate()
