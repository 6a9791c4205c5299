"""BYOL: an online network with a predictor regresses a momentum target network's projection of the other view."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import mlp_head
from .momentum import MomentumImageSSLModule, momentum_copy


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's ``2 - 2 cos(p, z)``, averaged over this rank's rows (the target carries no gradient)."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


class BYOL(MomentumImageSSLModule):
    """BYOL (Grill et al. 2020), symmetrised over the two views.

    Batch norm under DDP: the heads' batch norm would see only this rank's batch; the NA authors convert the model
    to SyncBatchNorm, and so do the shipped configs (``trainer.sync_batchnorm: true``, GPU).

    Args:
        proj_hidden_dim: projector and predictor hidden size (the NA authors: 1024).
        proj_output_dim: projection and prediction size (the NA authors: 128).
        base_tau, final_tau: target momentum, cosine from base to final (BYOL: 0.99 to 1).
        **kwargs: the encoder, evaluation and optimiser settings (``ImageSSLModule``, ``ContrastiveModule``); the
            optimiser's defaults are ``ContrastiveModule``'s (SGD, lr 0.1, no warm-up), and
            ``configs/pretrain/byol_cifar10.yaml`` sets the NA authors' CIFAR-10 ones.
    """

    method_name: ClassVar[str] = "byol"

    def __init__(
        self,
        proj_hidden_dim: int = 1024,
        proj_output_dim: int = 128,
        base_tau: float = 0.99,
        final_tau: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(base_tau=base_tau, final_tau=final_tau, **kwargs)
        self.projector = mlp_head(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.predictor = mlp_head(proj_output_dim, proj_hidden_dim, proj_output_dim)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.momentum_projector = momentum_copy(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    def method_loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Each view through its own forward pass (batch statistics per view, as the authors)."""
        p1, p2 = (self.predictor(self.projector(self.encoder(view))) for view in (view1, view2))
        with torch.no_grad():
            z1, z2 = (self.momentum_projector(self.momentum_encoder(view)) for view in (view1, view2))
        return regression_loss(p1, z2) + regression_loss(p2, z1)
