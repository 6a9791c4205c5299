"""One srun task of lightning_requeue.sbatch: a small 2-rank DDP fit with SLURMEnvironment(auto_requeue=True).

The first run is slowed down so that SIGUSR1 arrives mid-training; rank 0 records where each run started and
ended (fit_start_r<restart>.json, fit_end_r<restart>.json) and every process that saves a checkpoint appends
to saves.jsonl, all in the run directory. NUM_WORKERS sets DataLoader workers; KEEP_WORKER_HANDLERS=1 leaves
them Lightning's inherited signal handlers (to show the hazard).
"""

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, TensorDataset

run_dir = Path(os.environ["CLBD_RUN_DIR"])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
MAX_STEPS = 60
MAIN_PID = os.getpid()


def reset_slurm_signals_in_worker(worker_id: int) -> None:
    """SLURM signals every process of the step, DataLoader workers included, and a forked worker inherits
    Lightning's handlers: on SIGUSR1 the worker of rank 0 would write hpc_ckpt_N from its stale copy of the model
    (state at fork time), racing the real save. Workers ignore SIGUSR1 and die on SIGTERM instead."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if restart == 0:
            time.sleep(0.3)  # leaves time for the signal to come mid-run
        features, target = batch
        return torch.nn.functional.mse_loss(self.layer(features), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RecordRuns(L.Callback):
    def _record(self, name: str, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            data = {
                "global_step": trainer.global_step,
                "ckpt_path": trainer.ckpt_path,
                "world_size": trainer.world_size,
            }
            (run_dir / f"{name}_r{restart}.json").write_text(json.dumps(data))

    def on_train_start(self, trainer, pl_module):
        self._record("fit_start", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step == 3:
            (run_dir / f"step3_r{restart}").touch()  # the test signals once training is under way

    def on_train_end(self, trainer, pl_module):
        self._record("fit_end", trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Which processes save: a DataLoader worker that inherited Lightning's handler would show up here.
        line = {
            "restart": restart,
            "pid": os.getpid(),
            "main": os.getpid() == MAIN_PID,
            "rank": trainer.global_rank,
            "global_step": trainer.global_step,
        }
        with open(run_dir / "saves.jsonl", "a") as saves:
            saves.write(json.dumps(line) + "\n")


generator = torch.Generator().manual_seed(0)
dataset = TensorDataset(torch.randn(1024, 4, generator=generator), torch.randn(1024, 1, generator=generator))
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    num_nodes=1,
    strategy="ddp",
    plugins=[SLURMEnvironment(auto_requeue=True)],
    max_steps=MAX_STEPS,
    default_root_dir=run_dir,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[RecordRuns()],
)
num_workers = int(os.environ.get("NUM_WORKERS", "0"))
loader = DataLoader(
    dataset,
    batch_size=8,
    num_workers=num_workers,
    persistent_workers=num_workers > 0,
    worker_init_fn=None if os.environ.get("KEEP_WORKER_HANDLERS") else reset_slurm_signals_in_worker,
)
trainer.fit(Regression(), loader)
