"""The base LightningModule: optimiser and schedule, and evaluation results on disk.

Each method (the image methods through ``image_ssl.ImageSSLModule``, CLIP, the defenses) is a subclass that adds its
model, loss and evaluation; everything a run shares lives here, after solo-learn's ``BaseMethod``. What the training streams report (skip and
poison counts, each rank's stream position in checkpoints) is kept by the ``StreamBookkeeping`` callback, which every
module adds to its run (``configure_callbacks``).
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

from .epoch_timer import EpochTimer
from .optim import OPTIMIZER_IMPLS, build_optimizer, param_groups_no_decay, warmup_cosine
from .stream_bookkeeping import StreamBookkeeping

OPTIMIZERS = ("sgd", "lars", "adam", "adamw")
# torch.compile's modes (None: its default). "reduce-overhead" adds CUDA graphs, "max-autotune" both CUDA graphs and
# Triton's tuning of matmuls and convolutions, "max-autotune-no-cudagraphs" the tuning alone.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
        optimizer_impl: how the optimiser's update runs, the same update to float rounding: ``auto`` (torch's rule:
            vectorised over the parameters on a GPU, one parameter at a time on a CPU), ``for-loop``, ``foreach``
            (``torch._foreach_*``; LARS's own vectorised step) or ``fused`` (one kernel; SGD, Adam, AdamW only).
        compile: ``torch.compile`` the network (in place: parameter names and checkpoints stay the same). The
            first steps compile it: about a minute on a GPU for a ResNet-18; it needs a C++ compiler on a CPU.
        compile_mode: ``torch.compile``'s mode: ``default``, ``reduce-overhead`` (CUDA graphs: needs the static
            shapes clbd's training batches have), ``max-autotune`` or ``max-autotune-no-cudagraphs``.

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
        optimizer_impl: str = "auto",
        compile: bool = False,
        compile_mode: str = "default",
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"model.optimizer_impl: {optimizer_impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
        if optimizer_impl == "fused" and optimizer == "lars":
            raise ValueError("model.optimizer_impl: 'fused' has no LARS implementation; use 'foreach' for LARS")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode: {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.run_config: dict[str, Any] | None = None  # set by the CLI; stored in checkpoints
        self.stream_bookkeeping = StreamBookkeeping()  # counts, per-rank stream positions, data_report.json
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
        optimizer = build_optimizer(
            hp.optimizer,
            groups,
            lr=hp.lr,
            momentum=hp.momentum,
            betas=tuple(hp.betas),
            eps=hp.eps,
            impl=hp.get("optimizer_impl", "auto"),  # absent from checkpoints made before the option
        )
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
            mode = self.hparams.get("compile_mode", "default")
            module.compile(mode=None if mode == "default" else mode)
        return module

    # ---- stream bookkeeping (a callback) and checkpoints ---------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """Every run of a clbd module keeps its stream bookkeeping and times its epochs, whoever builds the Trainer
        (a timer the run was given stays: Lightning would replace it by the module's)."""
        given = any(isinstance(callback, EpochTimer) for callback in self.trainer.callbacks)
        return [self.stream_bookkeeping] + ([] if given else [EpochTimer()])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clbd_run_config"] = self.run_config

    def finish_fit(self, trainer: L.Trainer) -> None:
        """After fit (the CLI calls it): the data report (skips by kind, poisoned samples) beside the checkpoints."""
        self.stream_bookkeeping.write_report(trainer)

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
