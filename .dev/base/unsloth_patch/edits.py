"""Reversible edits: a plan is applied whole or not at all."""

from __future__ import annotations

_MISSING = object()


class Edits:
    """Records every change so that ``rollback()`` restores the previous state exactly."""

    def __init__(self):
        self._undo = []

    def setattr(self, obj, name: str, value) -> None:
        previous = getattr(obj, name, _MISSING) if name not in getattr(obj, "__dict__", {}) \
            else obj.__dict__[name]
        own = name in getattr(obj, "__dict__", {})
        setattr(obj, name, value)

        def undo():
            if own or previous is _MISSING:
                if previous is _MISSING:
                    try:
                        delattr(obj, name)
                    except AttributeError:
                        pass
                else:
                    setattr(obj, name, previous)
            else:  # the value came from the class: drop the instance attribute again
                try:
                    delattr(obj, name)
                except (AttributeError, TypeError):  # e.g. __class__, which can only be reassigned
                    setattr(obj, name, previous)

        self._undo.append(undo)

    def call(self, do, undo) -> None:
        """Run ``do()`` now and remember ``undo`` for a rollback."""
        do()
        self._undo.append(undo)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.rollback()
        return False
