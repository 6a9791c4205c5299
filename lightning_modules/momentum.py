"""A momentum (EMA) copy of the online network, shared by MoCo v2 and BYOL, after solo-learn's ``BaseMomentumMethod``.

After every optimiser step each target parameter becomes ``tau * target + (1 - tau) * online``, with ``tau`` rising
from ``base_tau`` to ``final_tau`` along a half cosine over the run (BYOL's schedule; ``final_tau = base_tau`` keeps
it constant, as MoCo). ``tau`` is a function of the global step, so an exact resume recomputes it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .image_ssl import ImageSSLModule


def momentum_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that the optimiser never sees (no gradients); it is part of the state dict."""
    return copy.deepcopy(module).requires_grad_(False)


def cosine_tau(step: int, total_steps: int, base_tau: float, final_tau: float) -> float:
    """BYOL's momentum at ``step``: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """``target = tau * target + (1 - tau) * online``, parameter by parameter (buffers keep their own statistics)."""
    for online_param, target_param in zip(online.parameters(), target.parameters(), strict=True):
        target_param.mul_(tau).add_(online_param.detach(), alpha=1.0 - tau)


class MomentumImageSSLModule(ImageSSLModule):
    """An image method with momentum targets: ``momentum_pairs`` names each (online, target) module pair.

    Args:
        base_tau: momentum at the first step.
        final_tau: momentum at the last step (cosine in between).
        **kwargs: as ``ImageSSLModule``.
    """

    def __init__(self, base_tau: float = 0.99, final_tau: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        for name, value in (("base_tau", base_tau), ("final_tau", final_tau)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{name} must be in [0, 1], got {value}")

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def current_tau(self) -> float:
        return cosine_tau(self.global_step, self.total_steps(), self.hparams.base_tau, self.hparams.final_tau)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        tau = self.current_tau()
        for online, target in self.momentum_pairs():
            ema_update(online, target, tau)
        self.log("train/tau", tau, on_step=True, on_epoch=False)
