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
