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
        for number, batch in enumerate(self.loader):
            if number < held:
                continue
            self.batches.append(batch)
            # Lightning takes len() batches and stops without asking for another: that pass is complete too.
            self.complete = len(self.batches) >= len(self)
            yield batch
        self.complete = True
