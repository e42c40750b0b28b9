"""sessmob.hotpath: the collector is held off inside the freeze window and comes back after."""

from __future__ import annotations

import gc

import pytest

from sessmob.hotpath import gc_paused, settle


def test_gc_is_off_inside_and_back_after_even_on_error() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_blocks_keep_the_outer_state() -> None:
    with gc_paused():
        with gc_paused():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_settle_freezes_what_exists() -> None:
    before = gc.get_freeze_count()
    keep = [[] for _ in range(100)]  # lists are tracked by the collector
    try:
        settle()
        assert gc.get_freeze_count() >= before + len(keep)
    finally:
        gc.unfreeze()
