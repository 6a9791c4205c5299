"""The shard stream: one IterableDataset that reads, splits, shuffles, decodes, poisons, augments and batches.

Per (rank, worker) the stream is, top to bottom::

    shards for this epoch          shuffled by (seed, epoch), split by rank, then by worker
    -> tar members -> samples      webdataset's key rule; a damaged tar ends its shard, counted once
                                   (data.resident: the same samples served from memory, decoded once)
    -> drop the attacker's pool    reference images never appear as clean samples
    -> shuffle raw bytes           buffer holds bytes, not pixels; seeded by (seed, epoch, rank, worker)
    -> skip consumed               on resume: raw samples are skipped without decoding
    -> decode                      RGB; bad samples skipped and counted
    -> poison                      deterministic per key (poisoning.PoisonPlan)
    -> views                       SimCLR: two views; CLIP: preprocess + tokens; eval: clean + triggered
    -> batches                     exactly the rank's share of the epoch, so every rank takes the same steps

Equal work per rank: the number of batches per rank is computed from the index counts before reading, and a
worker whose shards run short (skipped samples, uneven shards) starts another pass over its own shards until it
has delivered its share. Evaluation streams read every sample once instead (split by sample, no wrap).
"""

from __future__ import annotations

import copy
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from poisoning.keyhash import derive_seed

from .decode import decode_sample
from .faults import FaultCounter, uncounted
from .resident import ResidentShards
from .shards import ShardIndex, ShardRead, ShardSpecError, read_samples

SampleFn = Callable[[dict[str, Any], int], dict[str, Any]]


@dataclass
class StreamPosition:
    """Where one (rank, worker) stream stands; what a checkpoint carries to resume exactly."""

    epoch: int = 0
    consumed: int = 0  # raw samples taken from the shuffle buffer this epoch (decoded or skipped)
    batches: int = 0  # batches delivered this epoch
    poisoned: int = 0  # poisoned samples delivered this epoch
    excluded: int = 0  # reference-pool samples dropped this epoch
    seen: int = 0  # samples delivered in batches this epoch
    faults: dict[str, int] = field(default_factory=dict)


@dataclass
class EpochRemainder:
    """The rest of an epoch that a checkpoint written by another number of ranks interrupted.

    ``keys``: the samples that epoch had not taken yet, in the order they are dealt: global batch ``g`` holds keys
    ``[g * B, (g + 1) * B)``; rank ``r`` takes its ``B / ranks`` slice of each, worker ``g mod workers`` the batch.
    Every sample is then taken once over the epoch, whatever the old and new numbers of ranks and workers.
    """

    epoch: int
    keys: list[str]
    shard_of: dict[str, str]
    batches_done: int  # steps the epoch had taken before the checkpoint


def worker_quotas(stream_counts: list[int], batches_for_rank: int, batch_size: int) -> list[int]:
    """Split a rank's batches among its workers: each its whole batches first, then trim or top up the largest."""
    quotas = [count // batch_size for count in stream_counts]
    order = sorted(range(len(quotas)), key=lambda i: (-stream_counts[i], i))
    i = 0
    while sum(quotas) > batches_for_rank:
        worker = order[i % len(order)]
        if quotas[worker] > 0:
            quotas[worker] -= 1
        i += 1
    i = 0
    while sum(quotas) < batches_for_rank:
        quotas[order[i % len(order)]] += 1
        i += 1
    return quotas


class ShardStream(IterableDataset):
    """A WebDataset shard set as a resumable stream of ready batches (use with ``batch_size=None`` loaders).

    ``to_item(sample, epoch)`` turns a decoded (and possibly poisoned) sample into the tensors of one item;
    ``collate(items)`` stacks a batch. ``train=True``: shuffled, equal batches per rank, full batches only.
    ``train=False``: every sample exactly once in shard order, split by sample across ranks and workers.
    ``resident``: the shards' samples decoded in memory (``datamodules.resident``), served in place of the tars.
    """

    def __init__(
        self,
        index: ShardIndex,
        *,
        batch_size: int,
        to_item: SampleFn,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        need_label: bool = False,
        need_text: bool = False,
        poison: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        excluded_keys: frozenset[str] = frozenset(),
        excluded_per_shard: dict[str, int] | None = None,
        max_samples: int | None = None,
        min_image_size: int = 8,
        name: str = "train",
        resident: ResidentShards | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.index = index
        self.batch_size = batch_size
        self.to_item = to_item
        self.collate = collate
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.need_label = need_label
        self.need_text = need_text
        self.poison = poison
        self.excluded_keys = excluded_keys
        self.excluded_per_shard = excluded_per_shard or {}
        self.max_samples = max_samples
        self.min_image_size = min_image_size
        self.name = name
        if resident is not None and resident.min_size != min_image_size:
            raise ValueError(
                f"{name}: shards decoded in memory with min size {resident.min_size}, not {min_image_size}"
            )
        self.resident = resident
        self.rank = 0
        self.world_size = 1
        self.num_workers = 0
        self.epoch = 0
        self._position = StreamPosition()
        self._resume: StreamPosition | None = None
        self._faults = FaultCounter()
        self._uncounted = uncounted()
        self._replaying = False
        self.remainder: EpochRemainder | None = None
        # Samples (tar members grouped by key) this instance has read from its shards, every pass and resume
        # replay included; per process (each loader worker counts its own copy). A pass reads each sample once.
        self.raw_reads = 0

    # ---- layout -------------------------------------------------------------------------------------------
    def configure(self, *, rank: int, world_size: int, num_workers: int) -> None:
        """Fix the layout before workers start, failing early when the shards cannot feed it."""
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        streams = world_size * max(num_workers, 1)
        if self.train and len(self.index.shards) < streams:
            raise ShardSpecError(
                f"{self.name}: {len(self.index.shards)} shard(s) cannot feed {world_size} rank(s) x "
                f"{max(num_workers, 1)} worker(s) = {streams} streams; write more, smaller shards "
                f"(clbd data ... --maxcount) or lower num_workers"
            )
        if self.train and self.batches_per_rank() < 1:
            raise ShardSpecError(
                f"{self.name}: {self.usable_samples()} samples give no full batch of {self.batch_size} per rank "
                f"on {world_size} rank(s); lower the batch size or add data"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def usable_samples(self) -> int:
        total = self.index.total - sum(self.excluded_per_shard.values())
        return min(total, self.max_samples) if self.max_samples is not None else total

    def batches_per_rank(self) -> int:
        if self.train:
            return self.usable_samples() // (self.world_size * self.batch_size)
        # Eval: sample i goes to stream i mod S; each worker ends with its own partial batch.
        workers = max(self.num_workers, 1)
        streams = self.world_size * workers
        mine = range(self.rank * workers, (self.rank + 1) * workers)
        return sum(-(-len(range(s, self.usable_samples(), streams)) // self.batch_size) for s in mine)

    def __len__(self) -> int:
        remainder = self._active_remainder()
        if remainder is not None:
            return remainder.batches_done + len(remainder.keys) // (self.world_size * self.batch_size)
        return self.batches_per_rank()

    def _active_remainder(self) -> EpochRemainder | None:
        remainder = self.remainder
        return remainder if self.train and remainder is not None and remainder.epoch == self.epoch else None

    def taken_keys(self, epoch: int, world_size: int, positions: list[list[dict[str, Any]]]) -> set[str]:
        """Keys that streams of another layout (``positions[rank][worker]``, their loader states) had taken in
        ``epoch``: each stream replayed on raw bytes, decoding nothing."""
        taken: set[str] = set()
        for rank, workers in enumerate(positions):
            for worker, position in enumerate(workers):
                if int(position.get("epoch", -1)) != epoch:
                    continue
                old = copy.copy(self)
                old.configure(rank=rank, world_size=world_size, num_workers=len(workers) if len(workers) > 1 else 0)
                old.epoch, old._replaying, old._position = epoch, True, StreamPosition(epoch=epoch)
                shards = old._assignment(worker, max(len(workers), 1))
                raw = old._passes([self.index.shards[s].url for s in shards], worker)
                taken.update(sample["__key__"] for sample in itertools.islice(raw, int(position["consumed"])))
        return taken

    def _remainder_samples(self, remainder: EpochRemainder, worker: int, workers: int) -> tuple[Iterator, int]:
        """This (rank, worker)'s share of an epoch's remainder, and its number of batches."""
        global_batch = self.world_size * self.batch_size
        batches = len(remainder.keys) // global_batch
        mine: list[str] = []
        for g in range(worker, batches, workers):
            start = g * global_batch + self.rank * self.batch_size
            mine += remainder.keys[start : start + self.batch_size]
        wanted = set(mine)
        urls = sorted({remainder.shard_of[key] for key in mine})

        def passes() -> Iterator[dict[str, Any]]:
            for number in itertools.count():
                delivered = 0
                for raw in self._raw_samples(urls, first_pass=number == 0):
                    if raw["__key__"] in wanted:
                        delivered += 1
                        raw["__pass__"] = number
                        yield raw
                if delivered == 0:
                    return

        return passes(), len(range(worker, batches, workers))

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.index.shards)))
        if self.train:
            random.Random(derive_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order

    def _assignment(self, worker: int, workers: int) -> list[int]:
        """Shards of this (rank, worker): split by rank first, then by worker (webdataset's node/worker rule)."""
        return self._shard_order()[self.rank :: self.world_size][worker::workers]

    def _stream_count(self, shards: list[int]) -> int:
        return sum(
            self.index.shards[s].count - self.excluded_per_shard.get(self.index.shards[s].url, 0) for s in shards
        )

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        position = self._position
        return {
            "epoch": position.epoch,
            "consumed": position.consumed,
            "batches": position.batches,
            "poisoned": position.poisoned,
            "excluded": position.excluded,
            "seen": position.seen,
            "faults": self._faults.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = StreamPosition(
            epoch=int(state["epoch"]),
            consumed=int(state["consumed"]),
            batches=int(state["batches"]),
            poisoned=int(state.get("poisoned", 0)),
            excluded=int(state.get("excluded", 0)),
            seen=int(state.get("seen", 0)),
            faults=dict(state.get("faults", {})),
        )

    # ---- the pipeline ---------------------------------------------------------------------------------------
    def _counter(self, first_pass: bool) -> FaultCounter:
        """Where a fault goes: counted on an epoch's first read of a sample, nowhere on a re-read (a worker's
        extra pass over its shards, a resume's replay of what the checkpoint already counted)."""
        return self._faults if first_pass and not self._replaying else self._uncounted

    def raw_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """The undecoded samples of ``urls`` in order, read (and counted in ``raw_reads``) as training reads them."""
        return self._raw_samples(urls)

    def _raw_samples(self, urls: list[str], first_pass: bool = True) -> Iterator[dict[str, Any]]:
        """Samples of each shard in turn; each shard is judged once, when it has been read to its end."""
        expected = {shard.url: shard.count for shard in self.index.shards}
        for url in urls:
            outcome = ShardRead(url)
            for raw in (self.resident.read if self.resident is not None else read_samples)(url, outcome):
                self.raw_reads += 1
                yield raw
            self._judge_shard(outcome, expected.get(url, 0), self._counter(first_pass))

    @staticmethod
    def _judge_shard(outcome: ShardRead, expected: int, faults: FaultCounter) -> None:
        url, read = outcome.url, outcome.samples
        if outcome.error is not None and read == 0:
            faults.add("shard_unreadable", f"{url}: no sample read ({outcome.error})")
        elif outcome.error is not None:
            faults.add("shard_truncated", f"{url}: broke off after {read} sample(s) ({outcome.error})")
        elif read < expected:
            # tarfile reads a tar cut at a header boundary as a clean end: only the index tells.
            faults.add("shard_truncated", f"{url}: read {read} of the {expected} samples its index lists")
        lost = max(expected - read, int(outcome.cut))
        if lost:
            faults.add("sample_lost", n=lost)

    def _passes(self, urls: list[str], worker: int) -> Iterator[dict[str, Any]]:
        """Train: shuffled pass after pass over this stream's shards (the quota decides when to stop).

        Each pass is shuffled on its own (one generator across passes), so a pass never mixes with the next.
        """
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, "buffer"))
        for number in itertools.count():
            delivered = 0
            for raw in self.shuffled(self._without_pool(urls, first_pass=number == 0), rng):
                delivered += 1
                raw["__pass__"] = number
                yield raw
            if delivered == 0:
                raise RuntimeError(
                    f"{self.name}: shards {urls} hold no readable sample; check them with clbd data info"
                )

    def _without_pool(self, urls: list[str], first_pass: bool = True) -> Iterator[dict[str, Any]]:
        for raw in self._raw_samples(urls, first_pass):
            if raw["__key__"] in self.excluded_keys:
                self._position.excluded += int(first_pass and not self._replaying)
                continue
            yield raw

    def shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        """The shuffle-buffer stage: ``samples`` through a buffer of ``shuffle_buffer`` (public, so the data pipeline
        benchmark times the stage itself)."""
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _eval_samples(self, stream_id: int, streams: int) -> Iterator[dict[str, Any]]:
        """Eval: every sample once, in shard order, sample i going to stream i mod streams."""
        urls = [self.index.shards[s].url for s in self._shard_order()]
        # Every eval stream reads every shard: the first alone judges them, so a damaged shard counts once.
        for i, raw in enumerate(self._raw_samples(urls, first_pass=stream_id == 0)):
            if self.max_samples is not None and i >= self.max_samples:
                return
            if i % streams == stream_id:
                yield raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume, self._resume = self._resume, None
        if resume is not None and resume.epoch == self.epoch:
            self._position = resume
            self._faults.counts = Counter(resume.faults)
        else:
            self._position = StreamPosition(epoch=self.epoch)
            self._faults = FaultCounter()
        position = self._position

        remainder = self._active_remainder()
        if remainder is not None:
            raw, quota = self._remainder_samples(remainder, worker, workers)
        elif self.train:
            shards = self._assignment(worker, workers)
            counts = [self._stream_count(self._assignment(w, workers)) for w in range(workers)]
            quota = worker_quotas(counts, self.batches_per_rank(), self.batch_size)[worker]
            raw = self._passes([self.index.shards[s].url for s in shards], worker)
        else:
            quota = None
            raw = self._eval_samples(self.rank * workers + worker, self.world_size * workers)

        # Resume: replay the shuffle on raw bytes, decode nothing; the restored position counted all it reads.
        self._replaying = True
        for _ in range(position.consumed):
            next(raw, None)
        self._replaying = False

        items: list[dict[str, Any]] = []
        if quota is not None and position.batches >= quota:
            return
        for sample in raw:
            position.consumed += 1
            sample = decode_sample(
                sample,
                self._counter(sample.pop("__pass__", 0) == 0),
                need_label=self.need_label,
                need_text=self.need_text,
                min_size=self.min_image_size,
            )
            if sample is None:
                continue
            if self.poison is not None:
                sample = self.poison(sample)
                position.poisoned += int(sample.get("poisoned", False))
            items.append(self.to_item(sample, self.epoch))
            if not self.train and len(items) > self.batch_size:
                # Eval batches leave once the next sample is in: the last one then carries the stream's final
                # counts (the shards judged after its samples were read).
                yield self._batch(items[:-1], worker)
                items = items[-1:]
            elif self.train and len(items) == self.batch_size:
                yield self._batch(items, worker)
                items = []
                if quota is not None and position.batches >= quota:
                    # Stop before pulling another raw sample: past the quota the stream would begin a new pass
                    # and read a whole shuffle buffer of samples only to drop them.
                    break
        if items and not self.train:
            yield self._batch(items, worker)

    def _batch(self, items: list[dict[str, Any]], worker: int) -> dict[str, Any]:
        self._position.batches += 1
        self._position.seen += len(items)
        batch = self.collate(items)
        batch["stream_stats"] = {
            "stream": f"{self.name}/rank{self.rank}/worker{worker}",
            "epoch": self._position.epoch,
            "consumed": self._position.consumed,
            "poisoned": self._position.poisoned,
            "excluded": self._position.excluded,
            "seen": self._position.seen,
            "faults": self._faults.as_dict(),
        }
        return batch


def default_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep lists of strings; ``views`` (lists of tensors) become one tensor per view."""
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
            batch[name] = [torch.stack([v[i] for v in values]) for i in range(len(first))]
        elif isinstance(first, bool):
            batch[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch
