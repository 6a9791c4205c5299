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
    """Writes the sample keys of every training step, per rank: ``folder/rank{R}.jsonl`` (step, epoch, keys)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json
        from pathlib import Path

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"])}
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
