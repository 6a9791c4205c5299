"""BatchNorm run in float32 under a bf16/fp16 autocast.

Under ``bf16-mixed`` a convolution hands its BatchNorm a bf16 tensor, and PyTorch runs BatchNorm on cuDNN only for
float32 and float16 inputs: bf16 goes to its native kernels. ``keep_batchnorm_fp32`` makes every BatchNorm of a
module take its input in float32 (autocast off inside it, so cuDNN's float32 kernel and float32 statistics) and
hand back its output in the input's dtype, so what follows (ReLU, the residual add, the next convolution) reads what
it read before. The module keeps its class hierarchy (an ``isinstance(m, nn.BatchNorm2d)`` still holds), its
parameters, buffers and ``state_dict`` keys: checkpoints do not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _Float32Input:
    """Mixed into a BatchNorm class: float32 inside, the input's dtype outside."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype == torch.float32 and not torch.is_autocast_enabled(input.device.type):
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float()).to(input.dtype)


# Named module-level classes, so that a module holding them still pickles (spawned processes, torch.save).
class Float32BatchNorm1d(_Float32Input, nn.BatchNorm1d):
    pass


class Float32BatchNorm2d(_Float32Input, nn.BatchNorm2d):
    pass


class Float32BatchNorm3d(_Float32Input, nn.BatchNorm3d):
    pass


class Float32SyncBatchNorm(_Float32Input, nn.SyncBatchNorm):
    pass


_FP32_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: Float32BatchNorm1d,
    nn.BatchNorm2d: Float32BatchNorm2d,
    nn.BatchNorm3d: Float32BatchNorm3d,
    nn.SyncBatchNorm: Float32SyncBatchNorm,
}


def keep_batchnorm_fp32(module: nn.Module) -> nn.Module:
    """Every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``module`` runs in float32, in place; returns ``module``.

    Apply it after any ``SyncBatchNorm.convert_sync_batchnorm``: that conversion builds new modules."""
    for child in module.modules():
        if isinstance(child, _BatchNorm) and not isinstance(child, _Float32Input):
            if type(child) not in _FP32_CLASSES:
                raise TypeError(f"keep_batchnorm_fp32: no float32 variant of {type(child).__name__}")
            child.__class__ = _FP32_CLASSES[type(child)]
    return module


def batchnorm_fp32_count(module: nn.Module) -> int:
    """How many BatchNorms of ``module`` run in float32 (for checks and tests)."""
    return sum(isinstance(m, _Float32Input) for m in module.modules())
