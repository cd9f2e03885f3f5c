"""Evaluation of TRL's packed rows keeps every example to itself, as training does.

With ``eval_packing`` (on whenever ``packing`` is) TRL packs the evaluation dataset into rows of
several examples, recorded in its ``seq_lengths`` column. Whether those rows keep their
examples apart is up to the stack: TRL 0.20-0.23 drop the rows' ``position_ids`` unless
FlashAttention is selected, and transformers 4.x's SDPA ignores them; there a stock evaluation
lets each example attend to the ones before it in its row. Where the plan adds boundaries to
TRL's packed training rows (``boundaries_only``), the packed evaluation rows get the same:

``Trainer.get_eval_dataloader`` / ``get_test_dataloader``: a dataset with ``seq_lengths`` is
collated by the training rows' boundary-aware collator (the same flat ``[1, T]`` layout TRL's
packed rows have, with per-example ``position_ids`` and ``cu_seq_lens``). Any other dataset —
one the user passes unpacked, or any dataset of a run without TRL's packing — keeps the
trainer's own collator, so ``predict()`` returns stock-shaped predictions and labels.

``Trainer.evaluation_loop``: on such a dataloader the plan's model edits (the attention that
reads the boundaries) are in place for the loop, also after ``train()``, and rolled back after
it; inside ``train()`` they already are.
"""

from __future__ import annotations

from .training_edits import active, plan_of, train_collator

PACKED_COLUMN = "seq_lengths"  # TRL's record of the examples in each packed row


def is_packed(dataset) -> bool:
    """Whether ``dataset`` holds rows TRL packed from several examples."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict is not a dataset the trainer iterates
        return False
    return bool(names) and PACKED_COLUMN in names


def _boundary_collator(trainer, dataset):
    """The training rows' collator when ``dataset`` is packed by TRL in a run that adds boundaries, else None."""
    plan = plan_of(trainer)
    if plan is None or not plan.boundaries_only or not is_packed(dataset):
        return None
    collator = train_collator(trainer)
    return None if collator is trainer.data_collator else collator


def _dataset_of(trainer, eval_dataset):
    if isinstance(eval_dataset, str):
        return trainer.eval_dataset[eval_dataset]
    return eval_dataset if eval_dataset is not None else trainer.eval_dataset


def handle_dataloader(proceed, trainer, args, kwargs):
    """``get_eval_dataloader(eval_dataset)`` and ``get_test_dataloader(test_dataset)``."""
    given = args[0] if args else kwargs.get("eval_dataset", kwargs.get("test_dataset"))
    collator = _boundary_collator(trainer, _dataset_of(trainer, given))
    if collator is None:
        return proceed(*args, **kwargs)
    own = trainer.data_collator
    trainer.data_collator = collator
    try:
        return proceed(*args, **kwargs)
    finally:
        trainer.data_collator = own


def handle_evaluation_loop(proceed, trainer, args, kwargs):
    dataloader = args[0] if args else kwargs.get("dataloader")
    if _boundary_collator(trainer, getattr(dataloader, "dataset", None)) is None:
        return proceed(*args, **kwargs)
    with active(trainer):
        return proceed(*args, **kwargs)
