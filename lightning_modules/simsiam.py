"""SimSiam: a predictor on one branch, a stop-gradient on the other; no negatives, no momentum network."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import mlp_head
from .image_ssl import ImageSSLModule


def negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's ``-cos(p, stopgrad(z))``, averaged over this rank's rows."""
    return -F.cosine_similarity(prediction, target.detach(), dim=-1).mean()


class SimSiam(ImageSSLModule):
    """SimSiam (Chen & He 2021), symmetrised over the two views.

    Batch norm under DDP: as BYOL, SyncBatchNorm (``trainer.sync_batchnorm: true`` in the shipped configs, GPU),
    the NA authors' choice.

    Args:
        proj_hidden_dim: projector hidden size (3 layers, batch norm on the output too; the NA authors: 512).
        proj_output_dim: projection and prediction size (the NA authors: 2048).
        pred_hidden_dim: predictor bottleneck (the NA authors: 512).
        fix_predictor_lr: the predictor keeps the peak rate, no warm-up or cosine (SimSiam and the NA authors).
        **kwargs: the encoder, evaluation and optimiser settings (``ImageSSLModule``, ``ContrastiveModule``); the
            optimiser's defaults are ``ContrastiveModule``'s (SGD, lr 0.1, no warm-up), and
            ``configs/pretrain/simsiam_cifar10.yaml`` sets the NA authors' CIFAR-10 ones.
    """

    method_name: ClassVar[str] = "simsiam"

    def __init__(
        self,
        proj_hidden_dim: int = 512,
        proj_output_dim: int = 2048,
        pred_hidden_dim: int = 512,
        fix_predictor_lr: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.projector = mlp_head(self.feature_dim, proj_hidden_dim, proj_output_dim, layers=3, output_norm=True)
        self.predictor = mlp_head(proj_output_dim, pred_hidden_dim, proj_output_dim)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        return list(self.predictor.parameters()) if self.hparams.fix_predictor_lr else []

    def method_loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        z1, z2 = (self.projector(self.encoder(view)) for view in (view1, view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
