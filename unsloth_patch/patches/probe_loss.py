"""The loss a checkpointing probe step runs: the trainer's own, with what a ``compute_loss`` call changes put back."""

from __future__ import annotations

import contextlib

_COLLECTIVES = ("gather", "gather_for_metrics", "reduce", "pad_across_processes")


def trainer_loss(trainer):
    """The trainer's own ``compute_loss`` (TRL's fused LM head, its metrics' extra work) for the probe,
    with the bookkeeping it touches (TRL's metric lists and token counters) put back afterwards.

    Its metric gathers stay local to this process: ranks probe different candidates (each stops at
    its first fit, or runs out of memory), so a collective inside the probe would pair one rank's
    gather with another's next step — a hang. The probe's metrics are discarded anyway. It runs in
    the trainer's ``compute_loss_context_manager`` (transformers 4.x's CPU autocast), as a step does.
    """
    def loss_fn(model, batch):
        saved = _bookkeeping(trainer)
        accelerator = getattr(trainer, "accelerator", None)
        local = {name: vars(accelerator).get(name) for name in _COLLECTIVES if hasattr(accelerator, name)}
        for name in local:
            setattr(accelerator, name, _local_collective(name))
        context = getattr(trainer, "compute_loss_context_manager", None)
        try:
            with context() if context is not None else contextlib.nullcontext():
                return trainer.compute_loss(model, dict(batch))
        finally:
            for name, value in saved.items():
                setattr(trainer, name, value)
            for name, value in local.items():
                if value is None:
                    delattr(accelerator, name)
                else:
                    setattr(accelerator, name, value)

    return loss_fn


def _local_collective(name):
    def collective(tensor, *args, **kwargs):  # this process's value, as with one process
        return tensor

    collective.__name__ = name
    return collective


def _bookkeeping(trainer) -> dict:
    """Copies of the trainer's private counters and metric logs, which a ``compute_loss`` call updates."""
    import copy

    return {name: copy.deepcopy(value) for name, value in vars(trainer).items()
            if name.startswith("_") and not isinstance(value, bool) and _plain(value)}


def _plain(value, depth: int = 0) -> bool:
    """Numbers, strings and small containers of them (TRL's ``_metrics``, ``_total_train_tokens``)."""
    if isinstance(value, (int, float, str)):
        return depth > 0 or not isinstance(value, str)
    if depth > 3 or not isinstance(value, (dict, list)) or len(value) > 10_000:
        return False
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return all(isinstance(k, (str, int)) and _plain(v, depth + 1) for k, v in items)
