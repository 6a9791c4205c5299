"""Times each training epoch and each validation pass of a run: every clbd module attaches one (``configure_callbacks``).

Logged as ``time/train_epoch_s`` (the epoch's wall time minus its validation) and ``time/val_s`` into the run's
metrics (``metrics.csv``), where an experiment arm's provenance reads its seconds per epoch and per evaluation.
With ``path``, one JSON line per epoch also goes there as soon as the epoch ends (a run killed later keeps every
finished epoch): epoch, step, train and validation seconds, training images (both views of a SimCLR sample count
as two), images/s and the ``val/`` metrics logged so far.

A run given its own (``--trainer.callbacks+=lightning_modules.epoch_timer.EpochTimer --trainer.callbacks.path=...``)
keeps it instead of the module's. The device is synchronised at the four boundaries only: nothing inside a step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


def _synchronize(module) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class EpochTimer(Callback):
    def __init__(self, path: str | None = None, views_per_sample: int = 2):
        self.path = Path(path) if path else None
        self.views_per_sample = views_per_sample
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_seconds = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _synchronize(pl_module)
        self._epoch_start = time.perf_counter()
        self._val_seconds = 0.0
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        labels = batch.get("label") if isinstance(batch, dict) else None
        if isinstance(labels, torch.Tensor):
            self._samples += int(labels.shape[0])

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module)
        self._val_seconds += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _synchronize(pl_module)
        train = time.perf_counter() - self._epoch_start - self._val_seconds
        pl_module.log("time/train_epoch_s", train, sync_dist=False)
        if self._val_seconds:
            pl_module.log("time/val_s", self._val_seconds, sync_dist=False)
        if self.path is None or not trainer.is_global_zero:
            return
        images = self._samples * self.views_per_sample * trainer.world_size
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_s": round(train, 3),
            "val_s": round(self._val_seconds, 3),
            "train_images": images,
            "train_images_per_s": round(images / train, 1) if train > 0 else None,
        }
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("val/", "train/loss")) and isinstance(value, torch.Tensor) and value.numel() == 1:
                row[name] = round(float(value), 5)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
