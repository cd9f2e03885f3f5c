"""How long the plugin's own start-up took, and on what: measured, logged at train start, reported.

A user waits for everything between ``SFTTrainer(...)``/``train()`` and the first step. The parts
that are ours — deciding the plan, applying the training edits, the checkpointing probe, compiling
kernels — are timed here, per trainer, and summed; transformers' own start-up (dataloader, optimizer)
is counted apart, from the call of ``train()`` to the first step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

from . import log

_lock = threading.Lock()
_current: dict = {}  # phase -> seconds, for the trainer being set up / trained
_notes: dict = {}  # what a phase did (e.g. where the kernels compiled), for the same trainer
_last: Optional[dict] = None


def begin() -> None:
    """A new trainer: forget the previous one's phases."""
    global _current, _notes
    with _lock:
        _current, _notes = {}, {}


def note(name: str, text: str) -> None:
    """Say what a phase did, beside its time (one line per name)."""
    with _lock:
        _notes[name] = text


@contextlib.contextmanager
def phase(name: str):
    """Time one of our start-up phases (added up when it runs more than once)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        with _lock:
            _current[name] = _current.get(name, 0.0) + took


def train_started(called_at: float) -> dict:
    """At the first step: the summary of this start-up, logged once and kept for the report."""
    global _last
    with _lock:
        phases, notes = dict(_current), dict(_notes)
    ours = sum(phases.values())
    summary = {"phases": phases, "ours_s": ours, "to_first_step_s": time.perf_counter() - called_at}
    if notes:
        summary["notes"] = notes
    _last = summary
    parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items()) or "nothing"
    said = "".join(f"; {name}: {text}" for name, text in notes.items())
    log.logger.info("start-up: %s; ours %.2f s of %.2f s from train() to the first step%s",
                    parts, ours, summary["to_first_step_s"], said)
    return summary


def last() -> Optional[dict]:
    """The start-up of the most recent ``train()`` in this process (None before one)."""
    return _last
