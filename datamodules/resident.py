"""Shard sets read and decoded once and kept in host memory (``data.resident``), for CIFAR-scale data.

A resident shard set is read front to back once, in the training process before the loaders fork (their workers
share the pages). Each shard keeps how its read went (``ShardRead``) and its samples in tar order, with the image
member replaced by a ``DecodedImage``: the uint8 pixels, or None when decoding failed, and the faults decoding
counted. Streams then serve a shard from memory instead of its tar, with nothing else changed:

* the same samples in the same order, so shuffling, rank/worker splits, resume positions and poisoning (by key)
  are those of a run that reads the tars;
* every fault counted as a fresh read would count it: the shard's outcome is judged again after each read, and a
  sample's decoding faults are added again where ``decode_sample`` would have decoded it (so a re-read counts
  nothing, as before).

Memory: about height x width x 3 bytes per image plus ~0.6 kB of bookkeeping (CIFAR-10's 60k images: 176 MB of
pixels, 215 MB of resident memory measured; decoded in 10 s on one core).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .decode import DecodedImage, decode_member, image_member
from .shards import ShardIndex, ShardRead, read_samples

log = logging.getLogger("clbd.data")


def read_shard(url: str, min_size: int) -> tuple[ShardRead, list[dict[str, Any]]]:
    """One shard read to its end, its image members decoded (``DecodedImage``), and how reading it went."""
    outcome = ShardRead(url)
    samples = []
    for raw in read_samples(url, outcome):
        ext = image_member(raw)
        if ext is not None:  # the member decode_sample would decode
            raw[ext] = decode_member(raw[ext], raw["__key__"], min_size=min_size)
        samples.append(raw)
    return outcome, samples


class ResidentShards:
    """Every shard of ``index`` decoded into memory; ``read(url)`` serves a shard as ``read_samples`` would.

    ``processes`` > 1 decodes shards in that many processes (the loaders' share of the machine).
    """

    def __init__(self, index: ShardIndex, *, min_size: int, name: str = "train", processes: int = 1):
        self.min_size = min_size
        started = time.perf_counter()
        urls = [shard.url for shard in index.shards]
        processes = max(1, min(processes, len(urls)))
        if processes == 1:
            shards = [read_shard(url, min_size) for url in urls]
        else:
            # The platform's start method, as the loaders use it; read_shard is importable for spawn and forkserver.
            with ProcessPoolExecutor(processes) as pool:
                shards = list(pool.map(read_shard, urls, [min_size] * len(urls)))
        self._shards = dict(zip(urls, shards))
        self.nbytes = 0  # the decoded pixels held
        for _, samples in shards:
            for raw in samples:
                for member in raw.values():
                    if isinstance(member, DecodedImage) and member.pixels is not None:
                        member.pixels.setflags(write=False)  # served for the whole run: nothing may draw on it
                        self.nbytes += member.pixels.nbytes
        log.info(
            "data.resident: %s: %d shards, %d samples decoded into %.0f MB of host memory in %.1f s (%d processes)",
            name,
            len(urls),
            sum(len(samples) for _, samples in shards),
            self.nbytes / 2**20,
            time.perf_counter() - started,
            processes,
        )

    def read(self, url: str, outcome: ShardRead) -> Iterator[dict[str, Any]]:
        """The samples of one shard (each a fresh dict, so stream stages may change it) and, in ``outcome``, how
        reading its tar went; a shard the index did not list is an error (the stream and the cache disagree)."""
        if url not in self._shards:
            raise KeyError(f"data.resident: shard {url} was not in the shard set read into memory")
        stored, samples = self._shards[url]
        for sample in samples:
            outcome.samples += 1
            yield dict(sample)
        outcome.error, outcome.cut = stored.error, stored.cut
