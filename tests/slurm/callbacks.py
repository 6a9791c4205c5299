"""Callbacks the SLURM tests pass to the real job scripts as clbd overrides (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


def _restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


class PauseForPreemption(L.Callback):
    """Holds every rank after global step ``step`` of the run whose SLURM_RESTART_COUNT is ``restart`` until the
    job is ended (the SIGTERM of a requeue), so that a test's signal or requeue lands at a known step, with every
    rank in the same place. Rank 0 creates ``paused_r<restart>_step<step>`` in the run directory once there, and
    ``started_r<restart>_step<global step>`` when each run's training starts (after a checkpoint was restored).
    Compute is unchanged: a run with the pause is the same run as one without.
    """

    def __init__(self, step: int, restart: int = 0, timeout: float = 120.0):
        self.step = step
        self.restart = restart
        self.timeout = timeout

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, f"started_r{_restart()}_step{trainer.global_step}").touch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or _restart() != self.restart:
            return
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, f"paused_r{self.restart}_step{self.step}").touch()
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.1)  # Lightning's SIGUSR1 / SIGTERM handlers run here
