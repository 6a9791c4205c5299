"""What a DeepSpeed run needs before Lightning's ``DeepSpeedStrategy`` sets it up (any way it was named).

- DeepSpeed's micro batch is clbd's per-rank batch. Lightning would read it from the train loader's batch sampler,
  which clbd's loaders (streams of ready batches) do not have: it would fail, after building the loader.
- DeepSpeed (0.19 at least) broadcasts rank 0's parameters as bytes, ``p.data.view(torch.uint8)``, which fails on a
  0-dim parameter ("self.dim() cannot be 0 to view Float as Byte"): CLIP's ``logit_scale`` is one. The engine's
  broadcast (ZeRO-1/2) sees such parameters as 1-element views of the same storage; ZeRO-3's conversion of a 0-dim
  parameter broadcasts a 1-element view itself, then partitions the parameter as DeepSpeed does.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


def prepare_deepspeed(trainer: Any, datamodule: Any) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DeepSpeedStrategy):
        return
    if "train_micro_batch_size_per_gpu" not in strategy.config:
        strategy.config["train_micro_batch_size_per_gpu"] = max(datamodule.batch_size // trainer.world_size, 1)
    broadcast_scalar_parameters()
    partition_scalar_parameters()


def broadcast_scalar_parameters() -> None:
    """Wrap ``DeepSpeedEngine._broadcast_model`` (once) so that 0-dim parameters are broadcast as 1-element views."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    if getattr(original, "clbd_scalars", False) or "view(torch.uint8)" not in inspect.getsource(original):
        return

    @functools.wraps(original)
    def broadcast(engine) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)  # same storage: what rank 0 sends lands in the parameter itself
        try:
            original(engine)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    broadcast.clbd_scalars = True
    DeepSpeedEngine._broadcast_model = broadcast


def partition_scalar_parameters() -> None:
    """Wrap ZeRO-3's ``Init._zero_init_param`` (once) for 0-dim parameters: the same steps, a 1-element broadcast."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param
    source = inspect.getsource(original)
    expected = ("_convert_to_deepspeed_param(param)", "get_partition_dp_group(param)", "param.partition()")
    if getattr(original, "clbd_scalars", False) or not all(step in source for step in expected):
        return  # already wrapped, or another DeepSpeed whose steps this does not know: left as it is

    @functools.wraps(original)
    def zero_init_param(init, param) -> None:
        if param.dim() != 0:
            return original(init, param)
        init._convert_to_deepspeed_param(param)
        group = init.get_partition_dp_group(param)
        source_rank = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), source_rank, group)
        param.partition()

    zero_init_param.clbd_scalars = True
    Init._zero_init_param = zero_init_param
