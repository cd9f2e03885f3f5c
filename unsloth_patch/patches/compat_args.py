"""Keep ``SFTTrainer`` calls written for other TRL versions working.

TRL moved its arguments several times: ``tokenizer`` became ``processing_class`` (0.12), the
dataset/packing arguments left ``SFTTrainer.__init__`` for ``SFTConfig`` (0.13),
``max_seq_length`` became ``max_length`` (0.16-0.20), and a plain ``TrainingArguments`` is
still accepted as ``args``. Tutorials exist for every one of those layouts.

Everything here is decided from the installed TRL itself: the parameters of the original
``SFTTrainer.__init__`` (unwrapped) and the init fields of ``SFTConfig``. A spelling that the
installed TRL accepts is never touched; one it does not accept is moved to where this version
wants it, with one warning per translation. A value that has no home in this version, or two
spellings of the same setting with different values, is an error that names them.
Keyword arguments we know nothing about are passed through, so TRL raises its own error.

The user's objects are never modified: a config that needs a change is rebuilt (its
"explicitly passed" record, see :mod:`.config_fields`, is carried over).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from typing import Any, Optional

from .. import log, versions
from .config_fields import explicit_fields, mark_explicit
from .trl_shape import Shape, current_shape, field_default, init_fields, same, set_explicit, trl_version

try:  # errors meant for the user pass through the registry's containment
    from ..errors import UnslothPatchError as _UserError
except ImportError:  # pragma: no cover - older tree
    _UserError = ValueError

__all__ = [
    "TRAINER_TO_CONFIG",
    "CompatConflictError",
    "CompatUnplaceableError",
    "handle_sft_trainer_init",
    "handle_sft_config_init",
    "translate_trainer_call",
    "translate_config_call",
]


# Trainer parameters of TRL <= 0.12 that are SFTConfig fields from 0.13 on.
TRAINER_TO_CONFIG = (
    "dataset_text_field",
    "max_seq_length",
    "packing",
    "dataset_num_proc",
    "dataset_batch_size",
    "dataset_kwargs",
    "eval_packing",
    "num_of_sequences",
    "chars_per_token",
    "neftune_noise_alpha",
    "model_init_kwargs",
)

# Pairs of spellings of one setting: (older, newer). Each direction is translated when the
# installed TRL only knows the other spelling.
TRAINER_RENAMES = (("tokenizer", "processing_class"),)
CONFIG_RENAMES = (("max_seq_length", "max_length"),)

# Config fields TRL removed without a successor; a value given for one of them cannot be placed.
REMOVED_CONFIG_FIELDS = ("dataset_batch_size", "num_of_sequences", "chars_per_token")


class CompatConflictError(_UserError, TypeError):
    """Two spellings of one setting were given with different values."""


class CompatUnplaceableError(_UserError, TypeError):
    """An argument has no place in the installed TRL (removed without a successor)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Plan:
    """The call TRL will get, and the warnings that describe how it was obtained."""

    def __init__(self, args, kwargs):
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.messages: list[tuple[object, str]] = []

    def note(self, key: object, message: str) -> None:
        self.messages.append((key, message))

    def emit(self) -> None:
        for key, message in self.messages:
            log.once(("compat", key), logging.WARNING, "%s", message)


# --------------------------------------------------------------------------- SFTTrainer.__init__


def handle_sft_trainer_init(proceed, instance, args, kwargs):
    """Registry handler for ``SFTTrainer.__init__``: translate, then call TRL once."""
    try:
        plan = translate_trainer_call(args, kwargs, current_shape())
    except _UserError as error:
        return _refuse(proceed, args, kwargs, error)
    plan.emit()
    return proceed(*plan.args, **plan.kwargs)


def _refuse(proceed, args, kwargs, error: Exception):
    """Give TRL the call exactly as written; if it fails too, raise our clearer error from its.

    Our error is the better explanation of a call TRL rejects; if this TRL accepts the call
    as written, its own behaviour is kept and our objection is only logged.
    """
    try:
        result = proceed(*args, **kwargs)
    except Exception as stock:
        raise error from stock
    log.logger.warning("%s (TRL %s accepted the call as written; its behaviour is kept)", error, trl_version())
    return result


def translate_trainer_call(args, kwargs, shape: Shape) -> _Plan:
    """The positional/keyword arguments this TRL needs for an ``SFTTrainer(...)`` call."""
    plan = _Plan(args, kwargs)
    params = shape.trainer_params
    positional = params[: len(plan.args)]
    version = trl_version()

    def given(name: str) -> tuple[bool, Any]:
        if name in plan.kwargs:
            return True, plan.kwargs[name]
        if name in positional:
            return True, plan.args[positional.index(name)]
        return False, None

    # 1. renamed trainer parameters (both directions)
    for older, newer in TRAINER_RENAMES:
        for old, new in ((older, newer), (newer, older)):
            if old in plan.kwargs and old not in params and new in params:
                value = plan.kwargs.pop(old)
                present, other = given(new)
                if present and not same(value, other):
                    raise CompatConflictError(
                        f"SFTTrainer got both {old}= and {new}= with different values; they are two "
                        f"spellings of one argument (TRL {version} calls it {new}=). Pass only {new}=."
                    )
                if not present:
                    plan.kwargs[new] = value
                plan.note(("trainer", old, new),
                          f"SFTTrainer({old}=...) is spelled SFTTrainer({new}=...) in TRL {version}; translated.")

    # 2. trainer-level settings this TRL keeps in SFTConfig
    moves: dict[str, tuple[str, Any]] = {}  # config field -> (old trainer name, value)
    # (TRL 0.11/0.12 take them in both places and ask for the config: they go there too, which
    # also records them as explicitly passed.)
    for name in TRAINER_TO_CONFIG:
        if name not in plan.kwargs:
            continue
        destination = _config_destination(name, shape)
        if destination is None:
            if name in params or shape.trainer_takes_var_keyword:
                continue  # this TRL takes it itself
            raise CompatUnplaceableError(
                f"SFTTrainer({name}={_short(plan.kwargs[name])}): TRL {version} has no SFTTrainer parameter and "
                f"no SFTConfig field for {name!r} (it was removed); remove the argument."
            )
        value = plan.kwargs.pop(name)
        if destination in moves and not same(moves[destination][1], value):
            raise CompatConflictError(
                f"SFTTrainer got {moves[destination][0]}= and {name}= with different values; "
                f"both set SFTConfig.{destination} in TRL {version}."
            )
        moves[destination] = (name, value)

    # 3. the config: convert a plain TrainingArguments, build one if moves need it, apply moves
    where: Optional[tuple[str, Any]] = None
    if "args" in plan.kwargs:
        where, config = ("kw", "args"), plan.kwargs["args"]
    elif "args" in positional:
        where, config = ("pos", positional.index("args")), plan.args[positional.index("args")]
    else:
        config = None

    new_config = config
    if config is not None and _is_plain_training_arguments(config, shape):
        # converted here in any case: TRL's own conversion marks every field as passed (and TRL 0.19
        # on transformers 5 fails on it); said only where TRL would not convert it itself
        new_config = _convert_training_arguments(config, shape, moves, plan, version,
                                                 warn=not _trl_converts(config))
    elif moves:
        if config is None:
            new_config = _default_config(shape, plan, positional, moves, version)
        else:
            new_config = _config_with_moves(config, moves, version)
    if moves:
        for destination, (name, _) in moves.items():
            spelled = f"SFTConfig({destination}=...)"
            plan.note(("move", name, destination),
                      f"SFTTrainer({name}=...) belongs in {spelled} in TRL {version}; moved onto the config.")

    if new_config is not config:
        if where is None or where[0] == "kw":
            plan.kwargs["args"] = new_config
        else:
            plan.args[where[1]] = new_config
    return plan


def _config_destination(name: str, shape: Shape) -> Optional[str]:
    """The SFTConfig field that holds trainer-level ``name`` in this TRL (None: nowhere)."""
    for older, newer in CONFIG_RENAMES:
        if name == older and shape.config_has(newer):
            return newer
    if shape.config_has(name):
        return name
    for older, newer in CONFIG_RENAMES:
        if name == newer and shape.config_has(older):
            return older
    return None


def _aliases(field_name: str) -> tuple[str, ...]:
    for older, newer in CONFIG_RENAMES:
        if field_name in (older, newer):
            return (older, newer)
    return (field_name,)


def _check_move_conflicts(config, moves: dict, version: str) -> None:
    explicit = explicit_fields(config)
    cls = type(config)
    for destination, (name, value) in moves.items():
        if not hasattr(config, destination):
            continue
        current = getattr(config, destination)
        if explicit is not None:
            set_by_user = any(alias in explicit for alias in _aliases(destination))
        else:
            set_by_user = not same(current, field_default(cls, destination))
        if set_by_user and not same(current, value):
            raise CompatConflictError(
                f"SFTTrainer({name}={_short(value)}) conflicts with {cls.__name__}({destination}={_short(current)}): "
                f"both set {cls.__name__}.{destination} in TRL {version}. Keep one of them."
            )


def _config_with_moves(config, moves: dict, version: str):
    """A copy of the user's config with the moved trainer settings (the user's object is untouched)."""
    _check_move_conflicts(config, moves, version)
    explicit = explicit_fields(config)
    rebuilt = dataclasses.replace(config, **{d: v for d, (_, v) in moves.items()})
    set_explicit(rebuilt, None if explicit is None else set(explicit) | set(moves))
    return rebuilt


def _is_plain_training_arguments(config, shape: Shape) -> bool:
    if isinstance(config, shape.config_cls):
        return False
    training_args = sys.modules.get("transformers.training_args")
    cls = getattr(training_args, "TrainingArguments", None)
    return cls is not None and isinstance(config, cls) and dataclasses.is_dataclass(config)


def _trl_converts(config) -> bool:
    """Whether the installed SFTTrainer turns this TrainingArguments into an SFTConfig by itself.

    TRL 0.11-0.13 convert only the exact class ``TrainingArguments``; later releases any instance.
    """
    try:
        from trl.trainer.sft_trainer import SFTTrainer

        source = inspect.getsource(inspect.unwrap(SFTTrainer.__init__))
    except Exception:
        return False
    if "isinstance(args, TrainingArguments)" in source:
        return True
    return '__name__ == "TrainingArguments"' in source and type(config).__name__ == "TrainingArguments"


def _convert_training_arguments(config, shape: Shape, moves: dict, plan: _Plan, version: str, warn: bool = True):
    """This TRL's SFTConfig with every value of ``config`` (its values win over SFTConfig defaults)."""
    _check_move_conflicts(config, moves, version)
    source_cls = type(config)
    values = {}
    unplaceable = []
    explicit = explicit_fields(config)
    for name in init_fields(source_cls):
        value = getattr(config, name)
        if name in shape.config_fields:
            values[name] = value
        elif (explicit is not None and name in explicit) or not same(value, field_default(source_cls, name)):
            unplaceable.append(f"{name}={_short(value)}")
    if unplaceable:
        raise CompatUnplaceableError(
            f"SFTTrainer(args={source_cls.__name__}(...)): TRL {version}'s SFTConfig has no field for "
            f"{', '.join(unplaceable)}; pass an SFTConfig instead."
        )
    values.update({d: v for d, (_, v) in moves.items()})
    converted = shape.config_cls(**values)
    set_explicit(converted, None if explicit is None else (set(explicit) & set(shape.config_fields)) | set(moves))
    if warn:  # where TRL converts it itself we only did so to carry the moved settings: nothing to say
        plan.note(("convert", source_cls.__name__),
                  f"SFTTrainer(args={source_cls.__name__}(...)) is spelled SFTTrainer(args=SFTConfig(...)) in TRL "
                  f"{version}; converted, keeping every value.")
    return converted


def _default_config(shape: Shape, plan: _Plan, positional, moves: dict, version: str):
    """The SFTConfig TRL builds when ``args`` is not given, with the moved settings on it."""
    if versions.at_least("trl", "0.14"):
        if "model" in plan.kwargs:
            model = plan.kwargs["model"]
        elif "model" in positional:
            model = plan.args[positional.index("model")]
        else:
            model = None
        if isinstance(model, str):
            model_name = model
        else:
            model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        output_dir = f"{str(model_name).split('/')[-1]}-SFT"
    else:
        output_dir = "tmp_trainer"
    config = shape.config_cls(output_dir=output_dir, **{d: v for d, (_, v) in moves.items()})
    mark_explicit(config, set(moves) | {"output_dir"})
    return config


# --------------------------------------------------------------------------- SFTConfig.__init__


def handle_sft_config_init(proceed, instance, args, kwargs):
    """Handler for ``SFTConfig.__init__``: ``max_seq_length``/``max_length`` across versions."""
    try:
        plan = translate_config_call(type(instance), args, kwargs)
    except _UserError as error:
        return _refuse(proceed, args, kwargs, error)
    plan.emit()
    return proceed(*plan.args, **plan.kwargs)


def translate_config_call(config_cls, args, kwargs) -> _Plan:
    """The arguments this TRL's ``SFTConfig(...)`` needs for a call written for another version."""
    plan = _Plan(args, kwargs)
    fields = init_fields(config_cls)
    positional = fields[: len(plan.args)]
    version = trl_version()
    name = config_cls.__name__
    for older, newer in CONFIG_RENAMES:
        for old, new in ((older, newer), (newer, older)):
            if old in plan.kwargs and old not in fields and new in fields:
                value = plan.kwargs.pop(old)
                if new in plan.kwargs or new in positional:
                    other = plan.kwargs[new] if new in plan.kwargs else plan.args[positional.index(new)]
                    if not same(value, other):
                        raise CompatConflictError(
                            f"{name} got both {old}= and {new}= with different values; they are two spellings of "
                            f"one field (TRL {version} calls it {new}=). Pass only {new}=."
                        )
                else:
                    plan.kwargs[new] = value
                plan.note(("config", old, new), f"{name}({old}=...) is spelled {name}({new}=...) in TRL {version}; "
                                                 "translated.")
    for removed in REMOVED_CONFIG_FIELDS:
        if removed in plan.kwargs and removed not in fields:
            raise CompatUnplaceableError(
                f"{name}({removed}={_short(plan.kwargs[removed])}): TRL {version} removed this field and has no "
                "replacement for it; remove the argument."
            )
    return plan
