"""Remember which config fields the user actually passed.

"padding_free=False because the user said so" and "padding_free=False because that is the
default" must be told apart; a dataclass cannot, so the config's ``__init__`` is wrapped to
record the names it was called with.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

_ATTRIBUTE = "_unsloth_patch_explicit_fields"


def handle_config_init(proceed, instance, args, kwargs):
    names = set(kwargs)
    if args and dataclasses.is_dataclass(instance):
        init_fields = [f.name for f in dataclasses.fields(instance) if f.init]
        names.update(init_fields[: len(args)])
    result = proceed(*args, **kwargs)
    mark_explicit(instance, names)
    return result


def mark_explicit(config, names) -> None:
    """Record ``names`` as passed by the user (merged with any already recorded)."""
    try:
        already = explicit_fields(config) or frozenset()
        object.__setattr__(config, _ATTRIBUTE, frozenset(already | set(names)))
    except Exception:  # a frozen or slotted config: explicitness stays unknown
        pass


def explicit_fields(config) -> Optional[frozenset]:
    """The field names the user passed, or None when unknown (config built before the patch)."""
    return getattr(config, _ATTRIBUTE, None)


def was_explicit(config, name: str) -> Optional[bool]:
    """True/False when known; None when the config was created without the patch in place."""
    fields = explicit_fields(config)
    return None if fields is None else name in fields


def carry_explicit(source, target) -> None:
    """``target`` was built from every value of ``source`` (TRL turning a TrainingArguments into an
    SFTConfig): it was *passed* only what the user passed to ``source``."""
    given = explicit_fields(source)
    if given is None or target is source:
        return
    try:
        names = {f.name for f in dataclasses.fields(target)}
        object.__setattr__(target, _ATTRIBUTE, frozenset(given & names))
    except Exception:
        pass
