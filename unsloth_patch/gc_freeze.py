"""Garbage collections that pass over only what was made inside a block (``gc.freeze``).

A process that holds torch, transformers, TRL, a model, its tokenizer and its datasets tracks
millions of objects; a full collection of them takes 0.25-0.4 s (H200 host, 2026-12-03). Inside
our own start-up work -- waiting for the kernel compile threads, the checkpointing probe -- the
objects worth collecting are the ones that work made, so the older ones are frozen for the block
and given back to the collector after it. Stock's own full collections (``accelerator.free_memory()``
at the start of the training loop) run outside the block and still see everything.

A freeze made before the block is respected when it is a process's own (thousands of objects or
more: its collections are quick already). A few hundred frozen before the script's own work is
not: on the GPU machine of 2026-12-07 every benchmark process (stock's too) had 375 objects frozen
by the time ``train()`` ran, and the old rule (any freeze: leave it) let every probe collection
there walk the whole process, 0.3-0.44 s each, 2-3 s of a LoRA probe. Such a small freeze is
frozen on top of and given back to the collector with ours (``gc.unfreeze`` has no partial form),
which only makes those few objects collectable again.
"""

from __future__ import annotations

import contextlib
import gc


# a freeze of at least this many objects is a process's own (its collections are quick already): left as it is
OWN_FREEZE = 10_000


@contextlib.contextmanager
def quick_collections():
    """Collections inside the block, automatic or ``gc.collect()``, skip the objects that existed
    before it. Not when the process froze many objects itself: its freeze is left as it is."""
    if gc.get_freeze_count() >= OWN_FREEZE:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
