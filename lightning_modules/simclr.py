"""SimCLR: a projection head and NT-Xent over the global batch, on the shared image-method base."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .backbones import projection_head
from .image_ssl import ImageSSLModule
from .losses import NTXentLoss


class SimCLR(ImageSSLModule):
    """SimCLR (Chen et al. 2020): both views through encoder and projector, NT-Xent with every rank's negatives.

    Args:
        proj_hidden_dim: projection MLP hidden size.
        proj_output_dim: projection size (128 in SimCLR).
        temperature: NT-Xent temperature (0.5 for CIFAR-10 in the NA setup).
        optimizer, lr, warmup_fraction: SimCLR's own defaults, the NA setup on CIFAR-10: LARS, lr 0.5, warm-up over
            3% of the steps (the other optimiser settings: ``ContrastiveModule``'s defaults).
        **kwargs: the encoder, evaluation and other optimiser settings (``ImageSSLModule``, ``ContrastiveModule``).
    """

    method_name: ClassVar[str] = "simclr"

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        temperature: float = 0.5,
        optimizer: str = "lars",
        lr: float = 0.5,
        warmup_fraction: float = 0.03,
        **kwargs: Any,
    ):
        super().__init__(optimizer=optimizer, lr=lr, warmup_fraction=warmup_fraction, **kwargs)
        # compiled with the encoder when asked: the step's other half (Linear - BatchNorm1d - ReLU - Linear)
        self.projector = self.maybe_compile(projection_head(self.feature_dim, proj_hidden_dim, proj_output_dim))
        self.loss = NTXentLoss(temperature=temperature, gather=True)

    def method_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        return self.loss(z1, z2)
