"""How one patch meets its targets: find them, check their shape, wrap them, and undo it.

The table of patches and the bookkeeping of what applied are in ``registry.py``; this module knows
nothing of either. A target is ``module:Qualified.attribute``. A wrapper is a wrapt
``FunctionWrapper`` marked as ours, whose handler runs :func:`contained`, so that an error of our
logic never changes the user's call; removing it puts the original object back (same identity).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from typing import Callable

from . import log
from .errors import UnslothPatchError

__all__ = ["split", "load", "resolve", "check_parameters", "modules_ready", "still_importing", "unwrapped",
           "wrap", "contained"]


def split(target: str) -> tuple[str, list[str]]:
    module, _, path = target.partition(":")
    return module, path.split(".")


def load(name: str) -> Callable:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def resolve(target: str):
    """(owner, attribute, current value) of a target whose module is already imported."""
    module_name, path = split(target)
    owner = sys.modules[module_name]
    for part in path[:-1]:
        if not hasattr(owner, part):
            raise LookupError(f"{module_name} has no attribute {'.'.join(path[: path.index(part) + 1])}")
        owner = getattr(owner, part)
    if not hasattr(owner, path[-1]):
        raise LookupError(f"target {target} not found (the upstream API changed)")
    return owner, path[-1], getattr(owner, path[-1])


def check_parameters(target: str, value, parameters: tuple[str, ...]) -> None:
    if not parameters:
        return
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError) as exc:
        raise LookupError(f"target {target} has no inspectable signature ({exc})") from None
    missing = [p for p in parameters if p not in signature.parameters]
    if missing:
        raise LookupError(
            f"target {target} changed shape: its signature {signature} lacks {', '.join(missing)}"
        )


def modules_ready(targets) -> bool:
    return all(split(t)[0] in sys.modules for t in targets)


def still_importing(targets) -> bool:
    """A target module mid-import (circular imports) may simply not have defined the target yet."""
    for target in targets:
        spec = getattr(sys.modules.get(split(target)[0]), "__spec__", None)
        if getattr(spec, "_initializing", False):
            return True
    return False


def unwrapped(value):
    return getattr(value, "__wrapped__", value) if _is_ours(value) else value


def _is_ours(value) -> bool:
    try:
        return bool(getattr(value, "_self_unsloth_patch", None))
    except Exception:
        return False


def wrap(name: str, owner, attribute: str, handler) -> Callable[[], None]:
    import wrapt

    had_own = attribute in vars(owner) if isinstance(owner, type) else True
    original = vars(owner)[attribute] if isinstance(owner, type) and had_own else getattr(owner, attribute)
    wrapper = wrapt.FunctionWrapper(original, contained(name, handler))
    wrapper._self_unsloth_patch = name
    setattr(owner, attribute, wrapper)

    def restore() -> None:
        if had_own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)

    return restore


def contained(name: str, handler):
    """Run ``handler`` so that a failure of *our* logic never changes the user's call.

    The handler gets ``proceed`` instead of the original: if it raises before calling
    ``proceed``, the error is logged once and the original runs with the user's own
    arguments; if it raises after ``proceed`` returned, the original's result is kept;
    an error raised *by* the original propagates unchanged.
    """

    def wrapper(wrapped, instance, args, kwargs):
        state = {"entered": False, "returned": False, "result": None}

        def proceed(*call_args, **call_kwargs):
            state["entered"] = True
            result = wrapped(*call_args, **call_kwargs)
            state["returned"], state["result"] = True, result
            return result

        try:
            return handler(proceed, instance, args, kwargs)
        except UnslothPatchError:
            raise  # meant for the user (e.g. a toggle forced on where it cannot work)
        except Exception as exc:
            if state["entered"] and not state["returned"]:
                raise
            log.once(("error", name), logging.WARNING,
                     "patch %r failed (%s: %s); running the original behaviour for this call",
                     name, type(exc).__name__, exc, exc_info=log.logger.isEnabledFor(logging.DEBUG))
            if state["returned"]:
                return state["result"]
            return wrapped(*args, **kwargs)

    return wrapper
