"""Turn any padded causal-LM batch into a padding-free one, on the CPU, once per batch.

Working on the *output* of the collator TRL already chose (whatever its version) keeps every
label exactly as the padded run has it: completion-only and assistant-only masks, the
pad-token masking of older collators, truncation done during dataset preparation. Only the
layout changes: real tokens of every row are concatenated into one row, positions restart at
0 per sequence, the first label of each sequence is ignored (nothing is predicted across a
boundary), and the boundaries travel as ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from . import fallback

IGNORE_INDEX = -100
# Carried from the collator to the trainer's loss-token count, then removed from the batch.
LABEL_OFFSET_KEY = "unsloth_patch_label_offset"
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Per-token keys other than input_ids/labels that follow the tokens when flattening.
_PER_TOKEN_KEYS = ("token_type_ids", "completion_mask", "assistant_masks", "special_tokens_mask")


def boundaries_from_lengths(lengths) -> dict[str, Any]:
    """``cu_seq_lens_*`` and ``max_length_*`` for sequences of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    torch.cumsum(lengths, dim=0, out=cu[1:])
    longest = int(lengths.max()) if lengths.numel() else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def lengths_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence lengths of a flat ``[1, T]`` row whose positions restart at 0 per sequence."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    ends = torch.cat([starts[1:], starts.new_full((1,), flat.numel())])  # on the positions' device (a GPU)
    return (ends - starts).to(torch.int32)


def is_flat(batch: Mapping[str, Any]) -> bool:
    """Already padding-free: one row, positions given, and no padding in it."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return False
    if "position_ids" not in batch:
        return False
    mask = batch.get("attention_mask")
    return mask is None or bool(mask.all())


def flatten_batch(batch: Mapping[str, Any], count_first_labels: bool = False) -> dict[str, Any]:
    """Padded ``[B, L]`` batch (with ``attention_mask``) -> padding-free ``[1, T]`` batch.

    ``count_first_labels``: also return, under ``LABEL_OFFSET_KEY``, how many trainable labels
    were turned into ``-100`` at sequence starts, for trainers that count them in the padded run.
    """
    if is_flat(batch):
        return complete_flat_batch(batch)
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        raise ValueError(
            "a padding-free batch needs the padded batch's 2D attention_mask to find the real tokens; "
            f"got keys {sorted(batch)}"
        )
    lengths = mask.bool().sum(dim=1).to(torch.int32)
    if bool((lengths == 0).any()):  # an empty row has no token to train on
        rows = lengths > 0
        batch = {k: (v[rows] if _is_per_token(v, input_ids) else v) for k, v in batch.items()}
        input_ids, mask, lengths = batch["input_ids"], batch["attention_mask"], lengths[rows]
    keep = mask.bool()
    out: dict[str, Any] = {}
    out["input_ids"] = input_ids[keep].unsqueeze(0)
    positions = torch.cat([torch.arange(int(n), dtype=torch.long) for n in lengths]) if len(lengths) else \
        torch.zeros(0, dtype=torch.long)
    out["position_ids"] = positions.unsqueeze(0)
    labels = batch.get("labels")
    if labels is not None:
        flat_labels = labels[keep].clone()
        starts = boundaries_from_lengths(lengths)["cu_seq_lens_q"][:-1].long()
        masked_trainable = int((flat_labels[starts] != IGNORE_INDEX).sum())
        flat_labels[starts] = IGNORE_INDEX
        out["labels"] = flat_labels.unsqueeze(0)
        if count_first_labels:
            out[LABEL_OFFSET_KEY] = torch.tensor(masked_trainable, dtype=torch.long)
    for key in _PER_TOKEN_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.shape == mask.shape:
            out[key] = value[keep].unsqueeze(0)
    for key, value in batch.items():  # anything else (not per-token) passes through untouched
        if key not in out and key not in ("attention_mask", "position_ids") and not _is_per_token(value, input_ids):
            out[key] = value
    out.update(boundaries_from_lengths(lengths))
    return out


def complete_flat_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Add the boundary metadata (and drop an all-ones mask) for a batch that is already flat."""
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    if "cu_seq_lens_q" not in out:
        out.update(boundaries_from_lengths(lengths_from_position_ids(out["position_ids"])))
    labels = out.get("labels")
    if labels is not None:
        starts = out["cu_seq_lens_q"][:-1].long()
        if bool((labels[0, starts] != IGNORE_INDEX).any()):
            labels = labels.clone()
            labels[0, starts] = IGNORE_INDEX
            out["labels"] = labels
    return out


def _is_per_token(value: Any, input_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == input_ids.shape[:2]


COMPONENT = "padding-free collator"


class PaddingFreeCollator:
    """Wraps the collator TRL built and returns padding-free batches (the training dataloader's).

    Delegates everything else to the wrapped collator, so code that inspects the collator's
    attributes (``tokenizer``, ``pad_token_id``, ...) keeps working. If flattening fails, or a
    component the flat batches need (``needs``: the varlen attention) has been switched off, it
    returns the wrapped collator's padded batch: stock behaviour for the rest of the run.
    """

    def __init__(self, inner, count_first_labels: bool = False, boundaries: bool = True, needs=()):
        self.inner = inner
        self.count_first_labels = count_first_labels
        self.boundaries = boundaries  # False for models whose forward takes no such keywords
        self.needs = tuple(needs)

    def __call__(self, features, *args, **kwargs):
        batch = self.inner(features, *args, **kwargs)
        if not all(fallback.enabled(c) for c in (COMPONENT, *self.needs)):
            return batch
        try:
            flat = flatten_batch(batch, self.count_first_labels)
        except Exception as exc:
            fallback.failed(COMPONENT, exc, "padded batches")
            return batch
        if not self.boundaries:
            for key in BOUNDARY_KEYS:
                flat.pop(key, None)
        return flat

    def __getattr__(self, name):
        if name in ("inner", "needs", "boundaries", "count_first_labels"):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"PaddingFreeCollator({self.inner!r})"


def real_token_count(batch: Mapping[str, Any]) -> int:
    """Non-pad tokens in a padded or padding-free batch."""
    mask: Optional[torch.Tensor] = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())
