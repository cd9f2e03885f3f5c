"""A kernel that raises falls back to its PyTorch reference, for the rest of the run.

Each kernel's launch goes through :func:`run` inside its ``torch.library`` custom op, so the
backward pass is covered too: an error while compiling or launching a Triton kernel becomes one
warning and the same maths in plain PyTorch (exact, slower), never a failed training step.
Out-of-memory errors propagate, as they would in a stock run.
"""

from __future__ import annotations

from .. import fallback


def run(name: str, fast, reference, *args):
    """``fast(*args)`` unless ``name`` failed before; on an error, ``reference(*args)`` from now on."""
    if fallback.enabled(name):
        try:
            return fast(*args)
        except Exception as exc:
            if fallback.propagates(exc):
                raise
            fallback.failed(name, exc, "the same maths in plain PyTorch")
    return reference(*args)
