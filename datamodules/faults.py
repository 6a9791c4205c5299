"""Counting what a stream skipped, and saying so without flooding the log.

Every skip in the data path goes through a ``FaultCounter``: bad samples are counted by kind, never raised.
The counts travel with each batch (``batch["stream_stats"]``) so the training process can log and report them.
A stream counts each fault once per epoch: a shard is judged once when it has been read, each sample when it is
decoded; re-reads (a worker's extra passes, a resume's replay) count nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("clbd.data")

# The kinds a stream counts, so reports always show every one (zeros included).
FAULT_KINDS = (
    "shard_unreadable",  # a tar that delivered no sample: not a tar, empty, corrupt from its start
    "shard_truncated",  # a tar that broke off after some samples, or ended before the samples its index lists
    "sample_lost",  # samples a damaged shard did not deliver whole (its index's count, and the one cut in two)
    "image_undecodable",  # bytes that are not an image PIL can read
    "image_too_small",  # below the minimum side (e.g. 1x1)
    "image_too_large",  # above the pixel limit (decompression-bomb guard)
    "image_missing",  # a sample with no image member
    "label_missing",  # a labelled stream's sample with no usable .cls
    "caption_missing",  # a caption stream's sample with no usable .txt/.json caption
    "color_converted",  # grayscale/RGBA/CMYK/palette converted to RGB (not skipped; counted)
)


class RateLimitedWarner:
    """Logs the first few warnings of each kind, then at most one per ``interval`` seconds."""

    def __init__(self, first: int = 3, interval: float = 30.0):
        self.first = first
        self.interval = interval
        self._seen: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str) -> None:
        self._seen[kind] += 1
        now = time.monotonic()
        if self._seen[kind] <= self.first or now - self._last.get(kind, 0.0) >= self.interval:
            self._last[kind] = now
            log.warning("%s (%s #%d)", message, kind, self._seen[kind])


class FaultCounter:
    def __init__(self, warner: Callable[[str, str], None] | None = None):
        self.counts: Counter[str] = Counter({k: 0 for k in FAULT_KINDS})
        self.warn = warner or RateLimitedWarner()

    def add(self, kind: str, message: str = "", n: int = 1) -> None:
        self.counts[kind] += n
        if message and kind != "color_converted":
            self.warn(kind, message)

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}


def uncounted() -> FaultCounter:
    """A counter whose counts go nowhere and which warns of nothing: for samples a stream reads a second time."""
    return FaultCounter(warner=lambda kind, message: None)
