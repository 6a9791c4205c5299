"""What every LightningDataModule over WebDataset shards shares (the modalities' own: ``datamodules.modalities``).

Constructor arguments map one-to-one onto the YAML under ``data:`` (LightningCLI), so ``--print_config`` shows
everything a run used. The attack (a ``poisoning.Attack``) is one of those arguments: the poisoner is a stage of
the training stream, and evaluation streams carry each test image with the attack's test-time trigger applied.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from poisoning import Attack, Trigger
from poisoning.keyhash import derive_seed

from .builtin import resolve_builtin
from .catalog import KeyEntry, ShardReferenceSource, scan_catalog
from .replay import ReplayLoader
from .resident import ResidentShards
from .shards import ShardIndex, ShardSpecError, resolve_shards
from .stream import EpochRemainder, ShardStream, default_collate

log = logging.getLogger("clbd.data")

MANIFEST_NAME = "poison_manifest.jsonl"


def _worker_signals(worker_id: int) -> None:
    """Loader workers must not act on SLURM's requeue signal: they inherit Lightning's SIGUSR1 handler, and a
    worker's stale model copy would then race the real checkpoint to ``hpc_ckpt_N.ckpt``."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StreamLoader(StatefulDataLoader):
    """A stateful loader (torchdata) whose stream learns the epoch just before its workers start."""

    def __init__(self, dataset: ShardStream, epoch_fn: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, batch_size=None, worker_init_fn=_worker_signals, **kwargs)
        self._epoch_fn = epoch_fn
        self._next_epoch: int | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state taken after the last batch of an epoch resumes at the start of the next epoch. Lightning (2.6)
        creates the iterator before it counts that epoch as done, so the restored stream would hold the ended
        epoch: no batch, and the run would skip an epoch number (other data, one epoch less under max_epochs)."""
        ended = _ended_epoch(state_dict, self.dataset)
        if ended is None:
            self._next_epoch = None
            super().load_state_dict(state_dict)
        else:
            self._next_epoch = ended + 1
            super().load_state_dict({})

    def __iter__(self):
        epoch = self._next_epoch if self._next_epoch is not None else self._epoch_fn()
        self._next_epoch = None
        self.dataset.set_epoch(epoch)
        return super().__iter__()

    # An iterator's workers stop when the loader lets go of it. torchdata leaves that to the iterator's __del__, but
    # iterators sit in reference cycles, so the workers lived until a garbage collection, and loaders forked later
    # inherited the live iterator: their workers printed "AssertionError: can only test a child process" when they
    # collected it. Lightning stops the workers of torch's iterators when it drops them, not of torchdata's.
    @property
    def _iterator(self):
        return self.__dict__.get("_live_iterator")

    @_iterator.setter
    def _iterator(self, iterator) -> None:  # Lightning sets None at the end of a loop
        current = self.__dict__.get("_live_iterator")
        if current is not None and current is not iterator:
            _stop_workers(current)
        self.__dict__["_live_iterator"] = iterator

    def _get_iterator(self):
        """A new iterator replaces the current one: its workers stop before the new ones are forked."""
        if self._iterator is not None and not self.persistent_workers:
            _stop_workers(self._iterator)
        return super()._get_iterator()


def _stop_workers(iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()


# What a loader hands over for the training device to make views or images from (views_on_device, images_on_device).
RAW_DEVICE_FIELDS = ("image_u8", "image_hw", "view_params", "image_params")


class MadeOnDevice:
    """A training loader's batches as training steps get them, for passes outside Lightning's loop (a defense's
    inversion or detection): the raw fields go to ``device`` and the data module's after-transfer step makes the
    views or images there; the other fields stay where the loader put them. Iterable more than once, like a loader."""

    def __init__(self, loader: StreamLoader, datamodule: L.LightningDataModule, device: torch.device):
        self.loader = loader
        self.datamodule = datamodule
        self.device = device

    def __iter__(self):
        for batch in self.loader:
            raw = {name: batch[name].to(self.device) for name in RAW_DEVICE_FIELDS if name in batch}
            yield self.datamodule.on_after_batch_transfer({**batch, **raw}, 0)


def _worker_positions(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The stream positions of a loader state, one per worker (one without workers)."""
    if not state:
        return []
    snapshots = (state.get("_snapshot") or {}).get("_worker_snapshots")
    if snapshots:
        ordered = sorted(snapshots.items(), key=lambda item: int(str(item[0]).rsplit("_", 1)[-1]))
        return [s["dataset_state"] for _, s in ordered if isinstance(s.get("dataset_state"), dict)]
    return [state["dataset_state"]] if isinstance(state.get("dataset_state"), dict) else []


def _ended_epoch(state: dict[str, Any], stream: ShardStream) -> int | None:
    """The epoch a loader state was taken at the end of (every batch of this rank delivered), else None."""
    if not stream.train or not state:
        return None
    snapshots = (state.get("_snapshot") or {}).get("_worker_snapshots")
    positions = [s.get("dataset_state") for s in snapshots.values()] if snapshots else [state.get("dataset_state")]
    if not positions or any(not isinstance(p, dict) for p in positions):
        return None
    epochs = {int(p["epoch"]) for p in positions}
    if len(epochs) != 1 or sum(int(p["batches"]) for p in positions) < stream.batches_per_rank():
        return None
    return epochs.pop()


def _mark_clean(sample: dict[str, Any]) -> dict[str, Any]:
    sample["poisoned"] = False
    return sample


class ShardDataModule(L.LightningDataModule):
    """What SimCLR and CLIP data have in common: shard sets, batching across ranks, the poisoner, eval triggers.

    Args:
        train_shards: index file, folder, brace pattern or glob of the training shards;
            ``builtin:shapes/train`` is the embedded procedural dataset (generated on first use, no download).
        val_shards: clean evaluation shards used by the monitors each epoch (labelled).
        test_shards: shards for ``clbd test`` (labelled); defaults to ``val_shards``.
        batch_size: GLOBAL batch size (what papers quote); each of N ranks gets ``batch_size / N``.
        eval_batch_size: per-rank batch size of evaluation streams.
        num_workers: loader processes per rank; the training shards must number at least ranks x workers.
        seed: seeds shard order, shuffle buffers, augmentations (per key) and nothing else.
        shuffle_buffer: samples (raw bytes) held for shuffling per worker.
        attack: the poisoning attack (``configs/attack/*.yaml``), or None for a clean run.
        reference_shards: labelled shards holding the attacker's reference images; default: the training shards
            (their reference keys are then removed from the clean stream). A folder of references is the
            attack's own ``reference_dir``.
        class_names: names of the labels, when the shard index does not carry them.
        max_val_samples: read at most this many samples of the val shards (fast monitors on big sets).
        min_image_size: images with a smaller side are skipped (and counted).
        train_fraction: train on a fixed share of the training keys (chosen by a hash of seed and key, the same
            every epoch) — e.g. a defense's small clean set; None uses all.
        poison_train: False keeps the training stream clean while evaluation still applies the attack's test-time
            trigger (defenses fine-tune on clean data and measure ASR with the attack's trigger).
        pin_memory: loaders hand over batches in page-locked memory (faster, asynchronous copies to a GPU; no use
            on a CPU-only run).
        control_trigger: the control pattern eval batches carry beside the trigger (``image_control``: same size,
            blending and placement, a pattern no poison carries); default: the attack's own seeded control.
        resident: read and decode every shard set once (training, kNN bank, evaluation) and keep the images in
            host memory (``datamodules.resident``): loaders then skip tar reading and JPEG decoding. For
            CIFAR-scale sets (CIFAR-10: about 215 MB, 10 s at start-up on one core); the stream's order, resume
            state, poisoning and fault counts stay exactly those of reading the tars.
        cache_eval_batches: the monitors' evaluation batches (kNN bank, validation images with trigger and control:
            the same at every validation) are made by the loaders once, kept in host memory and replayed at each
            later validation (``datamodules.replay``), without loader processes. For CIFAR-scale sets: CIFAR-10's
            50k-image bank and 10k validation images take about 1 GB as float32 (at 224 px, 50x that).
    """

    modality: ClassVar[str] = ""

    def __init__(
        self,
        train_shards: str | None = "builtin:shapes/train",
        val_shards: str | None = "builtin:shapes/val",
        test_shards: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        attack: Attack | None = None,
        reference_shards: str | None = None,
        class_names: list[str] | None = None,
        max_val_samples: int | None = None,
        min_image_size: int = 8,
        train_fraction: float | None = None,
        poison_train: bool = True,
        pin_memory: bool = False,
        control_trigger: Trigger | None = None,
        resident: bool = False,
        cache_eval_batches: bool = False,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if attack is not None and attack.modality != self.modality:
            raise ValueError(
                f"data.attack: attack {attack.name!r} poisons {attack.modality} data, but this run's data is {self.modality}"
            )
        if train_fraction is not None and not 0 < train_fraction <= 1:
            raise ValueError(f"data.train_fraction must be in (0, 1], got {train_fraction}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.test_shards = test_shards or val_shards
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.attack = attack
        self.reference_shards = reference_shards
        self._class_names = list(class_names) if class_names else None
        self.max_val_samples = max_val_samples
        self.min_image_size = min_image_size
        self.train_fraction = train_fraction
        self.poison_train = poison_train
        self.pin_memory = pin_memory
        self.resident = resident
        self.cache_eval_batches = cache_eval_batches
        self._resident_sets: dict[tuple[str, ...], ResidentShards] = {}
        if control_trigger is not None and attack is None:
            raise ValueError(
                "data.control_trigger: given without data.attack; a control sits beside an attack's trigger"
            )
        if attack is not None:
            attack.set_control_trigger(control_trigger)
        self.plan = None
        self._remainder: EpochRemainder | None = None
        self._indexes: dict[str, ShardIndex] = {}
        self._catalog: list[KeyEntry] | None = None

    # ---- what the modules ask -----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        raise NotImplementedError

    def index(self, split: str) -> ShardIndex:
        """The resolved shard index of ``train`` / ``val`` / ``test`` (resolved once; errors name the field)."""
        if split not in self._indexes:
            spec = {"train": self.train_shards, "val": self.val_shards, "test": self.test_shards}[split]
            if not spec:
                raise ShardSpecError(f"data.{split}_shards: not set, but the {split} split is needed")
            self._indexes[split] = resolve_shards(resolve_builtin(spec), name=f"data.{split}_shards")
        return self._indexes[split]

    @property
    def class_names(self) -> list[str] | None:
        if self._class_names:
            return self._class_names
        for split in ("val", "test", "train"):
            try:
                names = self.index(split).classes
            except ShardSpecError:
                continue
            if names:
                return list(names)
        return None

    @property
    def target_index(self) -> int | None:
        """The attack's target class as an index into ``class_names`` (None without an attack)."""
        if self.attack is None:
            return None
        return self.attack.target_index(self.class_names)

    def world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def per_rank_batch_size(self) -> int:
        _, world_size = self.world()
        if self.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} (global) does not divide by the {world_size} ranks of this run"
            )
        return self.batch_size // world_size

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.per_rank_batch_size()
            self.index("train")
        if stage in ("fit", "validate") and self.val_shards:
            self.index("val")
        if stage == "test":
            self.index("test")
            self._check_eval_classes()
        if self.attack is not None:
            # Always, poisoned training or not: validation also fixes the trigger's size for this run's images,
            # so a clean defense run measures ASR exactly as clbd test does.
            self.attack.validate(self.modality, self.class_names, self.image_size)
            if stage == "test":
                self._check_non_target_images()
        if stage == "fit":
            if self.attack is not None and self.poison_train:
                self.plan = self.build_plan()
                self._write_manifest()
            self._check_train_subset()

    def _check_non_target_images(self) -> None:
        """ASR is measured on non-target-class test images: a test set with none of them is refused up front."""
        counts, target = self.index("test").class_counts, self.target_index
        if counts and target is not None and target < len(counts) and sum(counts) == counts[target]:
            raise ValueError(
                f"data.test_shards: every test image is of the target class {target}; ASR needs non-target images"
            )

    def _check_eval_classes(self) -> None:
        """The model reads its class names from the val set when there is one: the test set must use the same."""
        if self._class_names or not self.val_shards:
            return
        val, test = self.index("val").classes, self.index("test").classes
        if val and test and list(val) != list(test):
            raise ValueError(
                f"data.test_shards ({self.test_shards}) has classes {list(test)} but data.val_shards "
                f"({self.val_shards}) has {list(val)}: evaluate with one class list (or set data.class_names)"
            )

    def resident_shards(self, index: ShardIndex, name: str, build: bool = True) -> ResidentShards | None:
        """``index``'s samples decoded in memory (once per shard set, shared by the streams that read it), or None
        without ``resident``. Called while building a stream, in the training process: loader workers inherit it.
        ``build=False`` (a stream read once, e.g. ``clbd test``'s): only a set already in memory is used."""
        if not self.resident:
            return None
        urls = tuple(shard.url for shard in index.shards)
        if urls not in self._resident_sets and build:
            self._resident_sets[urls] = ResidentShards(
                index, min_size=self.min_image_size, name=name, processes=self.num_workers
            )
        return self._resident_sets.get(urls)

    def catalog(self) -> list[KeyEntry]:
        """Keys and labels of the training shards (read once from tar headers)."""
        if self._catalog is None:
            self._catalog = scan_catalog(self.index("train"))
        return self._catalog

    def _outside_subset(self) -> frozenset[str]:
        """Training keys left out by ``train_fraction`` (a fixed hash-chosen subset, the same every epoch)."""
        if self.train_fraction is None or self.train_fraction >= 1:
            return frozenset()
        threshold = self.train_fraction * 2**63
        return frozenset(e.key for e in self.catalog() if derive_seed(self.seed, e.key, "subset") >= threshold)

    def _check_train_subset(self) -> None:
        if self.train_fraction is None:
            return
        kept = len(self.catalog()) - len(self._outside_subset())
        if kept < self.batch_size:
            raise ValueError(
                f"data.train_fraction={self.train_fraction} keeps {kept} of {len(self.catalog())} training samples, "
                f"fewer than one global batch (data.batch_size={self.batch_size}); raise the fraction or add data"
            )

    def build_plan(self):
        """The poison plan: which keys, which references, which layout. Pure function of config and shards."""
        assert self.attack is not None
        catalog = self.catalog()
        if self.reference_shards:
            index = resolve_shards(resolve_builtin(self.reference_shards), name="data.reference_shards")
            references = ShardReferenceSource(index)
        else:
            references = ShardReferenceSource(self.index("train"), catalog)
        plan = self.attack.plan(catalog, references, image_size=self.image_size, class_names=self.class_names)
        summary = plan.summary()
        log.info("poisoning: %s", json.dumps(summary))
        return plan

    def _write_manifest(self) -> None:
        trainer = self.trainer
        if trainer is None or trainer.global_rank != 0 or self.plan is None:
            return
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / MANIFEST_NAME
        fresh = run_dir / (MANIFEST_NAME + ".new")
        self.plan.write_manifest(fresh)
        if path.exists() and path.read_bytes() != fresh.read_bytes():
            fresh.unlink()
            raise ValueError(
                f"{path} was written by a different attack or data config; use a new run directory "
                "(trainer.default_root_dir) rather than mixing two poisoned runs"
            )
        os.replace(fresh, path)
        (run_dir / "poison_summary.json").write_text(json.dumps(self.plan.summary(), indent=1) + "\n")

    @staticmethod
    def _excluded_per_shard(catalog: list[KeyEntry], excluded: frozenset[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in catalog:
            if entry.key in excluded:
                counts[entry.shard] = counts.get(entry.shard, 0) + 1
        return counts

    # ---- streams ------------------------------------------------------------------------------------------
    def _loader(self, dataset: ShardStream) -> StreamLoader:
        rank, world_size = self.world()
        dataset.configure(rank=rank, world_size=world_size, num_workers=self.num_workers)
        return StreamLoader(
            dataset,
            epoch_fn=self._epoch_to_stream if dataset.train else self._current_epoch,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _epoch_to_stream(self) -> int:
        """The epoch a new training iterator streams: the epochs whose training steps have all run.

        Not ``trainer.current_epoch``: that counts completed epochs, which lag one behind from an epoch's last step to
        the end of its ``on_train_epoch_end``, where ModelCheckpoint writes the epoch-end checkpoint. Lightning resumes
        from that checkpoint without the loader's state (it starts the next epoch afresh) but creates the iterator
        before it counts the epoch completed: the resumed run would train the next epoch on the ended one's stream.
        """
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def _eval_loader(self, dataset: ShardStream) -> StreamLoader | ReplayLoader:
        """A validation loader, replayed from memory after its first pass with ``cache_eval_batches``."""
        loader = self._loader(dataset)
        return ReplayLoader(loader) if self.cache_eval_batches else loader

    def train_stream(self) -> ShardStream:
        plan = self.plan
        if self.attack is not None and self.poison_train and plan is None:
            plan = self.plan = self.build_plan()
        excluded = (plan.excluded_keys if plan is not None else frozenset()) | self._outside_subset()
        return ShardStream(
            self.index("train"),
            batch_size=self.per_rank_batch_size(),
            to_item=self.train_item,
            collate=self.train_collate(),
            train=True,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            need_label=False,
            need_text=self.modality == "image-text",
            poison=plan.apply if plan is not None else _mark_clean,
            excluded_keys=excluded,
            excluded_per_shard=self._excluded_per_shard(self.catalog(), excluded) if excluded else None,
            min_image_size=self.min_image_size,
            name="train",
            resident=self.resident_shards(self.index("train"), "train"),
        )

    def eval_stream(self, split: str, *, max_samples: int | None = None) -> ShardStream:
        return ShardStream(
            self.index(split),
            batch_size=self.eval_batch_size,
            to_item=self.eval_item,
            collate=default_collate,
            train=False,
            seed=self.seed,
            need_label=True,
            max_samples=max_samples,
            min_image_size=self.min_image_size,
            name=split,
            resident=self.resident_shards(self.index(split), split, build=split != "test"),
        )

    def same_layout(self, loader_states: list[dict[str, Any] | None]) -> bool:
        """Whether a checkpoint's training loader states (one per rank) come from this run's ranks and workers."""
        _, world_size = self.world()
        workers = max(self.num_workers, 1)
        return len(loader_states) == world_size and all(
            len(_worker_positions(state)) in (0, workers) for state in loader_states
        )

    def resume_on_other_ranks(self, loader_states: list[dict[str, Any] | None]) -> EpochRemainder | None:
        """A checkpoint written by ``len(loader_states)`` ranks (or another number of loader workers), resumed on this
        run's layout: the rest of its epoch
        (the samples its streams had not taken) is dealt among this run's ranks and workers; later epochs are as a
        fresh run with this layout. Each sample keeps its poisoning and augmentations (seeded by key)."""
        positions = [_worker_positions(state) for state in loader_states]
        epochs = {int(p["epoch"]) for workers in positions for p in workers}
        if len(epochs) != 1:
            return None  # no stream had started an epoch: nothing to deal
        epoch = epochs.pop()
        template = self.train_stream()
        taken = template.taken_keys(epoch, len(loader_states), positions)
        done = sum(int(p["batches"]) for p in positions[0])
        remaining = [e for e in self.catalog() if e.key not in taken and e.key not in template.excluded_keys]
        random.Random(derive_seed(self.seed, epoch, "remainder")).shuffle(remaining)
        # Whole global batches, no more than the epoch's steps left: the step count and schedule stay those of any
        # layout (a layout's epoch leaves a few samples out; these are left out here, at the end).
        steps_left = max(template.usable_samples() // self.batch_size - done, 0)
        remaining = remaining[: min(len(remaining) // self.batch_size, steps_left) * self.batch_size]
        self._remainder = EpochRemainder(
            epoch=epoch,
            keys=[e.key for e in remaining],
            shard_of={e.key: e.shard for e in remaining},
            batches_done=done,
        )
        log.info(
            "resuming on another number of ranks (checkpoint: %d): epoch %d had taken %d samples in %d steps; "
            "its other %d are dealt among this run's ranks (%d steps)",
            len(loader_states),
            epoch,
            len(taken),
            done,
            len(remaining),
            len(remaining) // self.batch_size,
        )
        return self._remainder

    def train_batches_per_rank(self) -> int:
        """Batches each rank takes per epoch (from the index counts; no shard is read)."""
        stream = self.train_stream()
        rank, world_size = self.world()
        stream.configure(rank=rank, world_size=world_size, num_workers=self.num_workers)
        return len(stream)

    def train_dataloader(self) -> StreamLoader:
        stream = self.train_stream()
        stream.remainder = self._remainder
        return self._loader(stream)

    def train_batches(self, device: torch.device) -> MadeOnDevice:
        """A fresh training loader whose batches are finished as training steps see them (``MadeOnDevice``)."""
        return MadeOnDevice(self.train_dataloader(), self, device)

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return self._eval_loader(self.eval_stream("val", max_samples=self.max_val_samples))

    def test_dataloader(self):
        return self._loader(self.eval_stream("test"))

    # ---- per-sample items ---------------------------------------------------------------------------------
    def device_hook(self) -> Any:
        """The hook that makes training images on the device (``views_on_device``, ``images_on_device``): its
        ``item`` runs in the loaders, ``collate`` pads, ``finish`` runs after the transfer. None: loaders make all."""
        return None

    def train_collate(self):
        hook = self.device_hook()
        return hook.collate(default_collate) if hook is not None else default_collate

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch from the device path (raw uint8 images + parameters) is finished on the device."""
        hook = self.device_hook()
        if hook is not None and isinstance(batch, dict) and hook.raw_key in batch:
            batch = hook.finish(batch)
        return batch

    def train_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def eval_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        transform = self._eval_transform()
        item = {"image": transform(sample["image"]), "label": sample["label"], "key": sample["__key__"]}
        if self.attack is not None:
            item["image_triggered"] = transform(self.attack.test_trigger(sample["image"], sample["__key__"]))
            item["image_control"] = transform(self.attack.control_trigger(sample["image"], sample["__key__"]))
        return item

    def _eval_transform(self):
        raise NotImplementedError


__all__ = ["MANIFEST_NAME", "ShardDataModule", "StreamLoader"]
