"""Evaluation batches made once and replayed (``data.cache_eval_batches``).

The monitors' evaluation streams (kNN bank, validation images with the trigger and its control) depend on nothing
that changes during a run: the eval transform is deterministic and triggers are rendered by key. Their batches are
therefore the same at every validation, and a run that validates every epoch would have its loader processes
start, read and transform the same images hundreds of times. ``ReplayLoader`` keeps the batches of the first pass in
host memory and serves them from then on, in the same order, without loader processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class ReplayLoader:
    """Wraps an evaluation loader: the first pass reads it (and keeps its batches), later passes replay them.

    A pass stopped early (Lightning's sanity check, ``limit_val_batches``) keeps the batches it took; a later pass
    that goes further replays those and reads on from a fresh pass of the loader, skipping what it already holds.
    """

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.batches: list[Any] = []
        self.complete = False

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        yield from self.batches
        if self.complete:
            return
        held = len(self.batches)
        try:
            for number, batch in enumerate(self.loader):
                if number < held:
                    continue
                self.batches.append(batch)
                # Lightning takes len() batches and stops without asking for another: that pass is complete too,
                # and the loader is let go of before the last batch is handed out (Lightning will not come back).
                self.complete = len(self.batches) >= len(self)
                if self.complete:
                    release(self.loader)
                yield batch
                if self.complete:
                    return
            self.complete = True
        finally:  # the pass ended or was dropped (a stopped pass is read afresh next time)
            release(self.loader)


def release(loader: Iterable[Any]) -> None:
    """Lets go of a loader's current iterator as Lightning does at the end of a loop (``_iterator = None``): a
    ``StreamLoader`` stops its worker processes then. Left running, they lasted as long as the run, and a later step's
    workers forked beside them printed "can only test a child process"."""
    if hasattr(loader, "_iterator"):
        loader._iterator = None
