"""Counting what a stream skipped, and saying so without flooding the log.

Every skip in the data path goes through a ``FaultCounter``: bad samples are counted by kind, never raised.
The counts travel with each batch (``batch["stream_stats"]``) so the training process can log and report them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("clbd.data")

# The kinds a stream counts, so reports always show every one (zeros included).
FAULT_KINDS = (
    "shard_unreadable",  # a tar that could not be opened or is corrupt (the rest of that shard is lost)
    "shard_truncated",  # a tar that ended before the samples its index lists (cut at a member boundary)
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
    def __init__(self, warner: RateLimitedWarner | None = None):
        self.counts: Counter[str] = Counter({k: 0 for k in FAULT_KINDS})
        self.warn = warner or RateLimitedWarner()

    def add(self, kind: str, message: str = "", n: int = 1) -> None:
        self.counts[kind] += n
        if message and kind != "color_converted":
            self.warn(kind, message)

    def handler(self, kind: str) -> Callable[[BaseException], bool]:
        """A webdataset-style exception handler: count, warn, carry on."""

        def handle(exc: BaseException) -> bool:
            self.add(kind, f"skipped: {exc!r}"[:500])
            return True

        return handle

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}
