"""Our start-up work (waiting for the compile threads, the probe) collects only the garbage it made:
the objects the process held before are frozen for the block, and given back after it."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from unsloth_patch import warmup
from unsloth_patch.gc_freeze import quick_collections


class Cycle:
    def __init__(self):
        self.me = self


def unreachable_cycle() -> weakref.ref:
    """A reference cycle that only a garbage collection can free, seen through a weak reference."""
    return weakref.ref(Cycle())


@pytest.fixture(autouse=True)
def _no_freeze_left():
    assert gc.get_freeze_count() == 0
    yield
    assert gc.get_freeze_count() == 0  # every block gave its objects back


def test_inside_the_block_old_garbage_waits_and_new_garbage_is_collected():
    gc.disable()  # no automatic collection between making the old garbage and the block
    try:
        old = unreachable_cycle()  # garbage from before the block: frozen with the rest of the process
        with quick_collections():
            assert gc.get_freeze_count() > 0
            new = unreachable_cycle()  # the block's own garbage
            gc.collect()
            assert new() is None
            assert old() is not None
    finally:
        gc.enable()
    gc.collect()  # after the block, a full collection sees the old objects again
    assert old() is None


def test_a_freeze_of_the_users_is_left_as_it_is():
    """The block neither freezes on top of the user's freeze nor undoes it: what the user froze (the process,
    here well over ``OWN_FREEZE`` objects) stays out of every collection, during the block and after it."""
    from unsloth_patch.gc_freeze import OWN_FREEZE

    gc.disable()  # no automatic collection before the user's freeze
    try:
        theirs = unreachable_cycle()
        gc.freeze()
        assert gc.get_freeze_count() >= OWN_FREEZE
        try:
            with quick_collections():
                gc.collect()
                assert theirs() is not None
            gc.collect()
            assert theirs() is not None  # still frozen: the block did not unfreeze the user's objects
        finally:
            gc.unfreeze()
    finally:
        gc.enable()
    gc.collect()
    assert theirs() is None


def test_a_handful_frozen_at_start_up_does_not_keep_the_collections_slow(monkeypatch):
    """A freeze under ``OWN_FREEZE`` objects (an interpreter's start-up may leave a few hundred) does not turn
    the block off: the block freezes the rest of the process on top, so its collections still skip the
    garbage made before it; at its end every frozen object is given back, the earlier few included."""
    from unsloth_patch import gc_freeze

    gc.disable()
    try:
        gc.freeze()  # stands for the start-up's few: under the threshold below
        earlier = gc.get_freeze_count()
        monkeypatch.setattr(gc_freeze, "OWN_FREEZE", earlier + 1)
        old = unreachable_cycle()  # made after that freeze, before the block: not frozen yet
        with quick_collections():
            assert gc.get_freeze_count() > earlier  # frozen on top
            new = unreachable_cycle()
            gc.collect()
            assert new() is None and old() is not None
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0  # given back, the earlier few with the rest
    gc.collect()
    assert old() is None


def test_the_block_gives_the_objects_back_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with quick_collections():
            1 / 0
    assert gc.get_freeze_count() == 0


def test_waiting_for_the_compile_threads_freezes_what_existed_before(monkeypatch):
    seen, release = [], threading.Event()

    def compile_thread():
        release.wait()
        seen.append(gc.get_freeze_count())

    thread = threading.Thread(target=compile_thread, daemon=True)
    monkeypatch.setattr(warmup, "_threads", [thread])
    monkeypatch.setattr(warmup, "_tasks", [])
    thread.start()
    assert warmup.pending()
    release.set()
    warmup.wait(timeout=30)
    assert seen and seen[0] > 0  # the thread ran while the main thread's wait held the freeze
    assert gc.get_freeze_count() == 0 and not warmup.pending()
