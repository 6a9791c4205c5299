"""The base LightningModule: optimiser and schedule, stream bookkeeping, and evaluation results on disk.

Each method (the image methods through ``image_ssl.ImageSSLModule``, CLIP, the defenses) is a subclass that adds its
model, loss and evaluation; everything a run shares lives here, after solo-learn's ``BaseMethod``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from datamodules.faults import FAULT_KINDS

from .optim import LARS, param_groups_no_decay, warmup_cosine

OPTIMIZERS = ("sgd", "lars", "adam", "adamw")


class ContrastiveModule(L.LightningModule):
    """Shared by every clbd module.

    Args:
        optimizer: ``sgd``, ``lars`` (SimCLR), ``adam`` (BYOL; weight decay as an L2 term) or ``adamw`` (CLIP).
        lr: peak learning rate, reached after warm-up.
        weight_decay: not applied to biases, norms and the logit scale.
        momentum: SGD / LARS momentum.
        betas: Adam / AdamW betas.
        eps: Adam / AdamW epsilon.
        warmup_steps: linear warm-up length in optimiser steps (``warmup_fraction`` when 0).
        warmup_fraction: warm-up as a fraction of all steps, used when ``warmup_steps`` is 0.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        compile: wrap the network in ``torch.compile``.

    A subclass takes these through ``**kwargs`` (jsonargparse follows them here, so ``--print_config`` lists them
    with their defaults). A subclass with other defaults (SimCLR, CLIP, CleanCLIP) names only those settings in its
    own signature, with its defaults, and passes them on by name: there is one place for each default.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 0.0,
        compile: bool = False,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.run_config: dict[str, Any] | None = None  # set by the CLI; stored in checkpoints
        self.data_report: dict[str, Any] = {"faults": {k: 0 for k in FAULT_KINDS}, "poisoned": 0, "excluded": 0}
        self._stream_stats: dict[str, dict[str, Any]] = {}
        # Every subclass's constructor arguments too (Lightning reads the whole chain of __init__ frames).
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        """Checks that need the data module, before any compute: evaluation needs class names."""
        datamodule = getattr(self.trainer, "datamodule", None)
        evaluates = stage in ("test", "validate") or (stage == "fit" and getattr(datamodule, "val_shards", None))
        if datamodule is not None and evaluates and not datamodule.class_names:
            split = "test" if stage == "test" else "val"
            raise ValueError(
                f"data.{split}_shards: the eval set has no class names (its index has no 'classes'); "
                "give data.class_names or convert it with class folders"
            )

    # ---- optimisation -------------------------------------------------------------------------------------
    def optimized_module(self) -> torch.nn.Module:
        """The parameters to train (a defense may train only part of the model)."""
        return self

    def fixed_lr_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that keep the peak rate, outside warm-up and cosine (SimSiam's predictor)."""
        return []

    def configure_optimizers(self):
        hp = self.hparams
        groups = split_fixed_lr(
            param_groups_no_decay(self.optimized_module(), hp.weight_decay), self.fixed_lr_parameters()
        )
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        elif hp.optimizer == "lars":
            optimizer = LARS(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        total = self.total_steps()
        warmup = hp.warmup_steps or int(hp.warmup_fraction * total)
        if warmup > total:
            rank_zero_warn(f"model.warmup_steps={warmup} is longer than this run's {total} steps; warming up over all")
            warmup = total

        def cosine(step: int) -> float:
            return warmup_cosine(step, warmup, total, base=1.0, final=hp.min_lr_ratio)

        factors = [(lambda step: 1.0) if group.get("fixed_lr") else cosine for group in groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimiser steps of the whole run, for the schedule.

        Computed from the data module's own count rather than ``trainer.estimated_stepping_batches``: that one builds
        and iterates the train loader before a checkpoint's loader state is restored, which would lose exact resume.
        """
        trainer = self.trainer
        by_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
        if by_steps is not None and (trainer.max_epochs is None or trainer.max_epochs < 1):
            return by_steps
        per_epoch = trainer.datamodule.train_batches_per_rank()
        limit = trainer.limit_train_batches
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        steps = math.ceil(per_epoch / trainer.accumulate_grad_batches)
        by_epochs = max(steps * max(trainer.max_epochs or 1, 1), 1)
        # Both limits set: training stops at the first one, so the schedule must end there (a max_steps of 500
        # under max_epochs=2 of 39 steps used to leave the cosine at its start after 78 steps).
        return min(by_steps, by_epochs) if by_steps is not None else by_epochs

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` in place (``Module.compile``): parameter names, so checkpoints, stay the same."""
        if self.hparams.compile:
            module.compile()
        return module

    # ---- stream bookkeeping -------------------------------------------------------------------------------
    def track_batch(self, batch: dict[str, Any]) -> None:
        """Count poisoned samples and keep each stream's latest skip counts (they travel with the batch)."""
        poisoned = batch.get("poisoned")
        if poisoned is not None:
            self.log("train/poisoned_in_batch", poisoned.sum().float(), on_step=True, on_epoch=False)
        stats = batch.get("stream_stats")
        if isinstance(stats, dict) and "stream" in stats:
            self._stream_stats[stats["stream"]] = stats

    def on_train_epoch_end(self) -> None:
        """Sum every stream's counts of the epoch over workers and ranks into the run's data report.

        The counts come from the streams themselves (cumulative per epoch, part of the loader state), so a run
        resumed mid-epoch counts every sample exactly once. Streams count each fault once per epoch; the report
        keeps each epoch's counts (``per_epoch``) beside the run's totals.
        """
        counts = ("poisoned", "excluded", "seen")
        local = torch.zeros(len(FAULT_KINDS) + len(counts), dtype=torch.long, device=self.device)
        for stats in self._stream_stats.values():
            for i, kind in enumerate(FAULT_KINDS):
                local[i] += int(stats["faults"].get(kind, 0))
            for i, name in enumerate(counts):
                local[len(FAULT_KINDS) + i] += int(stats.get(name, 0))
        totals = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        totals = [int(t) for t in totals.tolist()]
        self._stream_stats.clear()
        epoch_faults = dict(zip(FAULT_KINDS, totals))
        poisoned, excluded, seen = totals[len(FAULT_KINDS) :]
        report = self.data_report
        for kind in FAULT_KINDS:
            report["faults"][kind] = report["faults"].get(kind, 0) + epoch_faults[kind]
            self.log(f"data/{kind}", float(report["faults"][kind]), sync_dist=False)
        report["poisoned"] += poisoned
        report["excluded"] += excluded
        report["samples_seen"] = report.get("samples_seen", 0) + seen
        # Each epoch's own counts too: a fault in the data is met once per epoch, so totals grow with epochs.
        report.setdefault("per_epoch", []).append(
            {
                "epoch": int(self.current_epoch),
                "samples_seen": seen,
                "poisoned": poisoned,
                "excluded": excluded,
                "faults": epoch_faults,
            }
        )
        self.log("train/poisoned_seen_epoch", float(poisoned), sync_dist=False)
        self.log("train/poisoned_seen_total", float(report["poisoned"]), sync_dist=False)
        self.log("train/samples_seen_epoch", float(seen), sync_dist=False)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clbd_run_config"] = self.run_config
        checkpoint["clbd_counters"] = {"data_report": self.data_report}
        # Lightning writes rank 0's checkpoint only, with rank 0's loader state; every rank streams its own shards,
        # so each rank's stream position (and its epoch's counts so far) is gathered into the file.
        mine = {"loaders": self._loader_states(), "stream_stats": self._stream_stats}
        checkpoint["clbd_per_rank"] = self._gather_objects(mine)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("clbd_counters") or {}
        if "data_report" in counters:
            self.data_report = counters["data_report"]
        per_rank = checkpoint.get("clbd_per_rank")
        if not per_rank or self._trainer is None or self.trainer.state.fn != "fit":
            return  # evaluating a checkpoint reads no training stream: any number of ranks will do
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        fit_loop = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("state_dict")
        if len(per_rank) != world_size:
            # Another number of ranks: the rest of the interrupted epoch is dealt among this run's streams (each
            # sample once); the old streams' counts so far are kept under their own names, on rank 0 only.
            self.trainer.datamodule.resume_on_other_ranks([(m.get("loaders") or [None])[0] for m in per_rank])
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

    def _loader_states(self) -> list[dict[str, Any]] | None:
        combined = getattr(self.trainer.fit_loop, "_combined_loader", None) if self._trainer is not None else None
        return combined._state_dicts() if combined is not None else None

    def _gather_objects(self, value: Any) -> list[Any]:
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [value]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def finish_fit(self, trainer: L.Trainer) -> None:
        """After fit: the data report (skips by kind, poisoned samples) beside the checkpoints."""
        if trainer.is_global_zero:
            report = dict(self.data_report, poisoned_seen=self.data_report["poisoned"], epochs=trainer.current_epoch)
            path = Path(trainer.default_root_dir) / "data_report.json"
            path.write_text(json.dumps(report, indent=1) + "\n")

    # ---- evaluation results -------------------------------------------------------------------------------
    @rank_zero_only
    def write_metrics(self, results: dict[str, Any]) -> Path:
        """``metrics.json`` beside the evaluated checkpoint (or in the run directory), one entry per checkpoint."""
        ckpt = self.trainer.ckpt_path if self._trainer is not None else None
        folder = Path(ckpt).parent if ckpt else Path(self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.json"
        entries = json.loads(path.read_text()) if path.exists() else {}
        entries[Path(ckpt).name if ckpt else "final"] = results
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @staticmethod
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    def all_ranks_sum(self, value: int | float) -> float:
        """Sum of a Python number over ranks (the number itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return float(self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="sum"))


def split_fixed_lr(groups: list[dict], fixed: list[torch.nn.Parameter]) -> list[dict]:
    """Each parameter group split in two: the parameters in ``fixed`` (marked ``fixed_lr``) and the rest."""
    if not fixed:
        return groups
    fixed_ids = {id(p) for p in fixed}
    split = []
    for group in groups:
        scheduled = [p for p in group["params"] if id(p) not in fixed_ids]
        constant = [p for p in group["params"] if id(p) in fixed_ids]
        split += [dict(group, params=scheduled)] if scheduled else []
        split += [dict(group, params=constant, fixed_lr=True, name=f"{group['name']}_fixed_lr")] if constant else []
    return split


def nan_if_none(value: float | None) -> float:
    """Loggers take floats: an undefined rate (None) is logged as NaN."""
    return float("nan") if value is None else float(value)
