"""What the training streams report, kept beside the model: skip counts by kind, poisoned samples, each rank's
stream position in the checkpoint, and ``data_report.json`` after fit.

``ContrastiveModule.configure_callbacks`` adds one ``StreamBookkeeping`` to every run, so a ``Trainer`` built by hand
gets it too. Everything goes through public Lightning hooks: the counts travel up inside each batch
(``on_train_batch_start``), are summed over ranks at ``on_train_epoch_end``, and are stored under the checkpoint's
``clbd_counters`` and ``clbd_per_rank`` keys.

Lightning writes rank 0's checkpoint only, with rank 0's loader state, while every rank streams its own shards. So
each rank's loader state is gathered into the file (``clbd_per_rank``) and, on resume, this rank's is put back where
Lightning's fit loop reads it. Both ends use the checkpoint dictionary, not the loop:

- saving: ``Trainer.save_checkpoint`` builds the checkpoint on every rank, and the fit loop's own entry
  (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``, this rank's loader states) is filled
  before any callback's ``on_save_checkpoint`` runs;
- loading: callbacks' ``on_load_checkpoint`` runs (``_restore_modules_and_callbacks``) before the loops' state is
  restored (``restore_training_state``), so the entry rewritten here is the one the fit loop loads.

The layout of ``checkpoint["loops"]`` is Lightning's (2.x) and not a documented interface: that dictionary path is the
one private detail this module relies on; no private attribute of the trainer or its loops is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.faults import FAULT_KINDS

STREAM_COUNTS = ("poisoned", "excluded", "seen")


def fresh_report() -> dict[str, Any]:
    return {"faults": {kind: 0 for kind in FAULT_KINDS}, "poisoned": 0, "excluded": 0}


class StreamBookkeeping(L.Callback):
    """Counts what the training streams skipped and poisoned, and keeps each rank's stream position in checkpoints.

    ``report`` is the run's data report: the totals, each epoch's own counts (``per_epoch``) and samples seen.
    """

    def __init__(self) -> None:
        self.report: dict[str, Any] = fresh_report()
        self._stream_stats: dict[str, dict[str, Any]] = {}
        self._unclosed: tuple[int, list[int]] | None = None  # a checkpoint's epoch and its counts, all ranks

    # ---- counting -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        """Log the batch's poisoned samples and keep each stream's latest counts (they travel with the batch)."""
        if not isinstance(batch, dict):
            return
        poisoned = batch.get("poisoned")
        if poisoned is not None:
            pl_module.log("train/poisoned_in_batch", poisoned.sum().float(), on_step=True, on_epoch=False)
        stats = batch.get("stream_stats")
        if isinstance(stats, dict) and "stream" in stats:
            self._stream_stats[stats["stream"]] = stats

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A checkpoint written after an epoch's last step but before this callback's ``on_train_epoch_end`` (at that
        step, in another callback's or the module's ``on_train_epoch_end``, by SLURM's signal) holds the epoch's
        counts unsummed. When Lightning resumes past that epoch (no hook of it runs again), they are added here."""
        unclosed, self._unclosed = self._unclosed, None
        if unclosed is not None and unclosed[0] < trainer.current_epoch:
            self._close_epoch(*unclosed)
            self._stream_stats.clear()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sum every stream's counts of the epoch over workers and ranks into the run's data report.

        The counts come from the streams themselves (cumulative per epoch, part of the loader state), so a run
        resumed mid-epoch counts every sample exactly once. Streams count each fault once per epoch; the report
        keeps each epoch's counts (``per_epoch``) beside the run's totals.
        """
        local = torch.tensor(stream_totals(self._stream_stats.values()), dtype=torch.long, device=pl_module.device)
        totals = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        self._stream_stats.clear()
        epoch = self._close_epoch(int(trainer.current_epoch), [int(t) for t in totals.tolist()])
        for kind in FAULT_KINDS:
            pl_module.log(f"data/{kind}", float(self.report["faults"][kind]), sync_dist=False)
        pl_module.log("train/poisoned_seen_epoch", float(epoch["poisoned"]), sync_dist=False)
        pl_module.log("train/poisoned_seen_total", float(self.report["poisoned"]), sync_dist=False)
        pl_module.log("train/samples_seen_epoch", float(epoch["samples_seen"]), sync_dist=False)

    def _close_epoch(self, epoch: int, totals: list[int]) -> dict[str, Any]:
        """Add one epoch's counts (``stream_totals`` summed over ranks) to the report; returns the epoch's entry."""
        epoch_faults = dict(zip(FAULT_KINDS, totals))
        poisoned, excluded, seen = totals[len(FAULT_KINDS) :]
        report = self.report
        for kind in FAULT_KINDS:
            report["faults"][kind] = report["faults"].get(kind, 0) + epoch_faults[kind]
        report["poisoned"] += poisoned
        report["excluded"] += excluded
        report["samples_seen"] = report.get("samples_seen", 0) + seen
        # Each epoch's own counts too: a fault in the data is met once per epoch, so totals grow with epochs.
        entry = {
            "epoch": epoch,
            "samples_seen": seen,
            "poisoned": poisoned,
            "excluded": excluded,
            "faults": epoch_faults,
        }
        report.setdefault("per_epoch", []).append(entry)
        return entry

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]):
        checkpoint["clbd_counters"] = {"data_report": self.report}
        # Every rank streams its own shards: each rank's stream position (and its epoch's counts so far) goes in.
        mine = {"loaders": fit_loop_state(checkpoint).get("combined_loader"), "stream_stats": self._stream_stats}
        checkpoint["clbd_per_rank"] = gather_objects(trainer, mine)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]):
        counters = checkpoint.get("clbd_counters") or {}
        if "data_report" in counters:
            self.report = counters["data_report"]
        per_rank = checkpoint.get("clbd_per_rank")
        if not per_rank or trainer.state.fn != "fit":
            return  # evaluating a checkpoint reads no training stream: any number of ranks will do
        world_size, rank = trainer.world_size, trainer.global_rank
        fit_loop = fit_loop_state(checkpoint, create=False)
        # Every rank's counts of the checkpoint's epoch, in case Lightning resumes past that epoch's end (see
        # on_train_start); the file holds them all, so no rank needs another's.
        epochs = {stats.get("epoch") for m in per_rank for stats in (m.get("stream_stats") or {}).values()}
        if len(epochs) == 1 and None not in epochs:
            totals = [stream_totals((m.get("stream_stats") or {}).values()) for m in per_rank]
            self._unclosed = (int(epochs.pop()), [sum(column) for column in zip(*totals)])
        loader_states = [(m.get("loaders") or [None])[0] for m in per_rank]
        if len(per_rank) != world_size or not trainer.datamodule.same_layout(loader_states):
            # Another number of ranks or loader workers: the rest of the interrupted epoch is dealt among this run's
            # streams (each sample once); the old streams' counts so far are kept under their own names, on rank 0.
            trainer.datamodule.resume_on_other_ranks(loader_states)
            self._stream_stats = {
                f"{name} (before the resume)": stats
                for m in (per_rank if rank == 0 else [])
                for name, stats in (m.get("stream_stats") or {}).items()
            }
            if fit_loop is not None:
                fit_loop["combined_loader"] = []  # the old layout's loader states fit no stream of this one
            return
        mine = per_rank[rank]
        self._stream_stats = dict(mine.get("stream_stats") or {})
        if fit_loop is not None and mine.get("loaders") is not None:
            fit_loop["combined_loader"] = mine["loaders"]

    # ---- after fit ------------------------------------------------------------------------------------------
    def write_report(self, trainer: L.Trainer) -> Path | None:
        """``data_report.json`` (skips by kind, poisoned samples, per epoch) in the run directory, from rank 0."""
        if not trainer.is_global_zero:
            return None
        report = dict(self.report, poisoned_seen=self.report["poisoned"], epochs=trainer.current_epoch)
        path = Path(trainer.default_root_dir) / "data_report.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        return path


def stream_totals(stats: Any) -> list[int]:
    """Fault counts by kind, then ``STREAM_COUNTS``, summed over streams' latest stats."""
    totals = [0] * (len(FAULT_KINDS) + len(STREAM_COUNTS))
    for one in stats:
        for i, kind in enumerate(FAULT_KINDS):
            totals[i] += int(one["faults"].get(kind, 0))
        for i, name in enumerate(STREAM_COUNTS):
            totals[len(FAULT_KINDS) + i] += int(one.get(name, 0))
    return totals


def fit_loop_state(checkpoint: dict[str, Any], create: bool = True) -> dict[str, Any] | None:
    """The fit loop's own entry of a Lightning checkpoint (``{}`` or None when it has none)."""
    state = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("state_dict")
    return state if state is not None or not create else {}


def gather_objects(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` on one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
