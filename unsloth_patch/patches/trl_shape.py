"""What the installed TRL's ``SFTTrainer`` and ``SFTConfig`` accept, read from TRL itself.

The argument translation (``compat_args.py``) decides every move from this: the parameters of the
original ``SFTTrainer.__init__`` (under every wrapper) and ``SFTConfig``'s init fields, cached per
function and class. Also the small helpers on config objects the translation shares: a field's
default, equality that never raises, and the record of explicitly passed fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Optional

from .. import versions
from .config_fields import mark_explicit

__all__ = ["SFT_TRAINER_MODULE", "SFT_CONFIG_MODULE", "Shape", "current_shape", "init_fields", "trl_version",
           "same", "field_default", "set_explicit", "sft_config_cls", "original"]

SFT_TRAINER_MODULE = "trl.trainer.sft_trainer"
SFT_CONFIG_MODULE = "trl.trainer.sft_config"


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the installed TRL accepts: trainer parameters (in order) and SFTConfig init fields."""

    trainer_params: tuple[str, ...]
    trainer_takes_var_keyword: bool
    config_cls: type
    config_fields: tuple[str, ...]

    def config_has(self, name: str) -> bool:
        return name in self.config_fields


_shape_cache: dict = {}


def original(function):
    """The function under every decorator and wrapper (wrapt, functools.wraps)."""
    return inspect.unwrap(function)


def sft_config_cls(trainer_module=None):
    module = sys.modules.get(SFT_CONFIG_MODULE)
    cls = getattr(module, "SFTConfig", None)
    if cls is None and trainer_module is not None:
        cls = getattr(trainer_module, "SFTConfig", None)
    if cls is None:
        import importlib

        cls = importlib.import_module(SFT_CONFIG_MODULE).SFTConfig
    return cls


def current_shape() -> Shape:
    """Introspect the installed TRL (cached per original function and config class)."""
    module = sys.modules.get(SFT_TRAINER_MODULE)
    if module is None:
        import importlib

        module = importlib.import_module(SFT_TRAINER_MODULE)
    init = original(vars(module.SFTTrainer)["__init__"])
    config_cls = sft_config_cls(module)
    key = (init, config_cls)
    shape = _shape_cache.get(key)
    if shape is None:
        parameters = list(inspect.signature(init).parameters.values())[1:]  # drop self
        shape = Shape(
            trainer_params=tuple(
                p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
            ),
            trainer_takes_var_keyword=any(p.kind is p.VAR_KEYWORD for p in parameters),
            config_cls=config_cls,
            config_fields=init_fields(config_cls),
        )
        _shape_cache.clear()
        _shape_cache[key] = shape
    return shape


def init_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def trl_version() -> str:
    version = versions.installed("trl")
    return str(version) if version is not None else "?"




def same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def field_default(cls, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            break
    return dataclasses.MISSING


def set_explicit(config, names: Optional[set]) -> None:
    """Make ``names`` exactly the record of explicitly passed fields (None: unknown)."""
    from . import config_fields

    attribute = getattr(config_fields, "_ATTRIBUTE", None)
    if attribute is None:  # pragma: no cover - record layout changed; merge instead
        if names is not None:
            mark_explicit(config, names)
        return
    try:
        if names is None:
            if attribute in vars(config):
                object.__delattr__(config, attribute)
        else:
            object.__setattr__(config, attribute, frozenset(names))
    except Exception:
        pass
