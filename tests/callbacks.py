"""Callbacks the tests name in configs (importable as ``tests.callbacks.X`` by jsonargparse and by the tests)."""

from __future__ import annotations

import lightning as L


class SimulatedPreemption(RuntimeError):
    pass


class InterruptAfterStep(L.Callback):
    """Simulates a preemption: the process dies right after global step ``step`` (its checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedPreemption(f"killed after step {self.step}")


class RecordKeys(L.Callback):
    """Writes the sample keys of every training step, per rank: ``folder/rank{R}.jsonl`` (step, epoch, keys and the
    batch's poisoned samples)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json
        from pathlib import Path

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"])}
        if "poisoned" in batch:
            line["poisoned"] = int(batch["poisoned"].sum())
        with open(Path(self.folder) / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")


class RecordWeights(L.Callback):
    """Rank 0 saves the module's weights at the start of training (after a resume has restored them) to ``path``;
    ZeRO-3's partitioned parameters are gathered first (every rank takes part)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        import contextlib

        import torch

        partitioned = [p for p in pl_module.parameters() if hasattr(p, "ds_id")]
        gathered = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
        with gathered:
            if trainer.is_global_zero:
                torch.save({name: t.detach().clone() for name, t in pl_module.state_dict().items()}, self.path)


class StopAt(L.Callback):
    """Simulates a preemption at ``hook`` of epoch ``epoch`` (sanity checks aside). Checkpoint callbacks run after
    every other callback, so ``on_train_epoch_end`` stops after the epoch's last step and before its checkpoint.
    ``save``: a file name in the run directory written first, as SLURM's requeue handler writes ``hpc_ckpt_N.ckpt``
    wherever the signal finds the run (e.g. during validation)."""

    HOOKS = (
        "on_train_epoch_start",
        "on_train_batch_start",
        "on_train_epoch_end",
        "on_validation_start",
        "on_validation_batch_end",
        "on_validation_end",
        "on_train_end",
    )

    def __init__(self, hook: str, epoch: int, save: str | None = None):
        if hook not in self.HOOKS:
            raise ValueError(f"hook: {hook!r} is not one of {self.HOOKS}")
        self.hook, self.epoch, self.save = hook, epoch, save
        for name in self.HOOKS:
            setattr(self, name, self._stopper(name))

    def _stopper(self, name: str):
        def hook(trainer, *args, **kwargs):
            if name != self.hook or trainer.sanity_checking or trainer.current_epoch != self.epoch:
                return
            if self.save:
                from pathlib import Path

                trainer.save_checkpoint(Path(trainer.default_root_dir) / self.save)
            raise SimulatedPreemption(f"killed at {name} of epoch {self.epoch}")

        return hook
