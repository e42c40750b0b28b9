"""Helpers for code that runs inside the migration's freeze window.

Python's cyclic garbage collector runs when allocations pass a threshold, whenever that
happens: a full collection in a process with a hundred thousand objects takes milliseconds,
which inside t_Mig would be the whole budget. The window allocates plenty (frames, messages,
snapshots), so the collector is held off while it runs and allowed again right after; what
became garbage meanwhile is collected then. `settle()` at start-up moves everything that
exists by then out of the collector's sight (gc.freeze), so later collections stay short.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused", "settle"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection inside the block. A nested block leaves the outer one's state;
    the collector is process-wide, so across threads the pause is best effort."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def settle() -> None:
    """After start-up: collect once, then exempt the survivors from future collections."""
    gc.collect()
    gc.freeze()
