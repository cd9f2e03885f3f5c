"""Register ``unsloth_varlen`` in transformers' AttentionInterface and AttentionMaskInterface.

The name avoids the word "flash": recent transformers treat any such name as a request for a
FlashAttention package and refuse unknown ones.
"""

from __future__ import annotations

from .dispatch import NAME, varlen_attention_forward, varlen_mask


def install(resolved):
    """Registry install hook; returns the function that undoes the registration."""
    from transformers.modeling_utils import AttentionInterface

    undo = [_register(AttentionInterface, NAME, varlen_attention_forward)]
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers without per-name mask builders: the mask is unused by our path
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        undo.append(_register(AttentionMaskInterface, NAME, varlen_mask))

    def uninstall():
        for step in reversed(undo):
            step()

    return uninstall


def _register(interface, name, function):
    mapping = interface._global_mapping
    had, previous = name in mapping, mapping.get(name)
    interface.register(name, function)

    def restore():
        if had:
            mapping[name] = previous
        else:
            mapping.pop(name, None)

    return restore
