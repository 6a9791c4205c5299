"""DeepSpeed on CPU for the tests: Lightning's ``DeepSpeedStrategy`` with its three CUDA-only refusals lifted.

DeepSpeed's own CPU accelerator (``DS_ACCELERATOR=cpu``) trains over gloo when oneCCL is absent. Lightning refuses it
in ``setup_environment`` (a CUDA check), ``setup_distributed`` (device-index validation) and by passing the CUDA
device index (None on CPU) as ``device_rank`` to ``deepspeed.initialize``; this subclass does neither. Name it as
``--trainer.strategy=tests.deepspeed_cpu.CPUDeepSpeedStrategy`` with ``DS_ACCELERATOR=cpu`` in the environment.

DeepSpeed JIT-compiles a shared-memory all-reduce (``deepspeed_shm_comm``, g++ + ninja, ~2 minutes cold on 2 cores)
when it initialises on CPU. The tests skip it: it is a CPU speed-up of the same sums gloo computes, nothing clbd
does depends on it, and compiling it would cost a tenth of CI's time budget. Importing this module (every process
does, when jsonargparse resolves the strategy's class path) makes ``build_shm_op`` report the op as unavailable, the
case DeepSpeed already handles (no compiler) by falling back to torch.distributed.
"""

from __future__ import annotations

import argparse
import importlib
import os

from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


def skip_shm_comm_op() -> None:
    """Patch the ``deepspeed.comm.torch`` module object itself: ``import deepspeed.comm.torch as m`` would bind the
    ``torch`` package that ``deepspeed.comm`` re-exports under that name, and patch nothing."""
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


if os.environ.get("DS_ACCELERATOR") == "cpu":
    skip_shm_comm_op()


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on the CPU accelerator (tests only; needs ``DS_ACCELERATOR=cpu``)."""

    def setup_environment(self) -> None:
        if os.environ.get("DS_ACCELERATOR") != "cpu":
            raise RuntimeError("CPUDeepSpeedStrategy needs DS_ACCELERATOR=cpu in the environment")
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # as DeepSpeedStrategy, without its CUDA device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # Lightning passes the CUDA index: None on CPU
            config=self.config,
            model=model,
            model_parameters=parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer
