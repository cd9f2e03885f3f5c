"""``Trainer.get_batch_samples``: count the loss tokens as the padded run counts them.

Transformers versions that count ``labels != -100`` over unshifted labels include each
padded row's first label, which a padding-free batch must set to -100. The collator carries
how many such labels it masked (``LABEL_OFFSET_KEY``); here that number is taken out of each
batch, before the model sees it, and added back to ``num_items_in_batch``.

Across ranks (``average_tokens_across_devices`` with more than one process) transformers sums
the count over the ranks; the masked labels are summed the same way. Whether that sum is taken
depends on the configuration only (the trainer's training collator counts first labels), never
on a rank's own batches: a rank whose batches carry no masked label (every first label already
ignored, or its collator fell back to padded batches) still takes part in the collective, so
the ranks cannot stall waiting for each other.
"""

from __future__ import annotations

import torch

from ..collate import LABEL_OFFSET_KEY


class _Stripping:
    """Iterates the epoch iterator, removing our key from each batch and summing it."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.offset = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        if isinstance(batch, dict) and LABEL_OFFSET_KEY in batch:
            self.offset += int(batch.pop(LABEL_OFFSET_KEY))
        return batch

    def __getattr__(self, name):
        return getattr(self.iterator, name)


def handle_get_batch_samples(proceed, instance, args, kwargs):
    args = list(args)
    if args:
        iterator = _Stripping(args[0])
        args[0] = iterator
    else:
        iterator = _Stripping(kwargs["epoch_iterator"])
        kwargs = dict(kwargs, epoch_iterator=iterator)
    batches, count = proceed(*args, **kwargs)
    if count is None:
        return batches, count
    across = _sums_across_ranks(instance)
    if iterator.offset == 0 and not across:
        return batches, count
    offset = torch.tensor(iterator.offset, dtype=torch.long)
    if across:  # every rank gathers, whatever its own offset (see the module docstring)
        accelerator = instance.accelerator
        offset = accelerator.gather(offset.to(accelerator.device)).sum()
    if isinstance(count, torch.Tensor):
        return batches, count + offset.to(count.device, count.dtype)
    return batches, type(count)(count + int(offset))


def _sums_across_ranks(trainer) -> bool:
    """Whether the count is summed over the ranks and this trainer's training batches carry masked labels.

    The same on every rank: it reads the training arguments, the process count and the collator
    the plan installed, not the batches.
    """
    from .training_edits import train_collator

    accelerator = getattr(trainer, "accelerator", None)
    if not (getattr(trainer.args, "average_tokens_across_devices", False)
            and getattr(accelerator, "num_processes", 1) > 1):
        return False
    try:
        return bool(getattr(train_collator(trainer), "count_first_labels", False))
    except Exception:  # a user's collator with an unusual __getattr__: it carries none of ours
        return False


def handle_prepare_inputs(proceed, instance, args, kwargs):
    """Evaluation batches do not pass through get_batch_samples: drop the key here."""
    inputs = args[0] if args else kwargs.get("inputs")
    if isinstance(inputs, dict):
        inputs.pop(LABEL_OFFSET_KEY, None)
    return proceed(*args, **kwargs)
