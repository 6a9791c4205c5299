"""MoCo v2: a query encoder, a momentum key encoder and a queue of past keys as negatives.

Batch norm under DDP: shuffle-BN, as the MoCo authors and the NA authors' SSL-Backdoor code. The key images of all
ranks are gathered, permuted by a permutation every rank draws alike (seeded by the global step), and each rank
encodes its slice, so a key's batch statistics come from other ranks' images than its query's and cannot leak the
positive pair. On one process the permutation changes nothing and is skipped. The queue takes the keys of every
rank (rank-major); it is a buffer, so checkpoints hold it with its write pointer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import mlp_head
from .losses import distributed_rank_and_world, gather_without_grad
from .momentum import MomentumImageSSLModule, momentum_copy


class MoCoV2(MomentumImageSSLModule):
    """MoCo v2 (Chen et al. 2020): InfoNCE of each query against its key and the queue.

    Args:
        proj_hidden_dim: projector hidden size (MLP without batch norm; the NA authors: the feature size, 512).
        proj_output_dim: key / query size (128).
        queue_size: keys kept as negatives; a multiple of the global batch size.
        temperature: InfoNCE temperature (the NA authors: 0.2).
        base_tau, final_tau: key-encoder momentum, cosine from base to final (MoCo: constant 0.999).
        **kwargs: the encoder, evaluation and optimiser settings (``ImageSSLModule``, ``ContrastiveModule``); the
            optimiser's defaults are ``ContrastiveModule``'s (SGD, lr 0.1, no warm-up), and
            ``configs/pretrain/moco_v2_cifar10.yaml`` sets the NA authors' CIFAR-10 ones.
    """

    method_name: ClassVar[str] = "moco_v2"

    def __init__(
        self,
        proj_hidden_dim: int = 512,
        proj_output_dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        base_tau: float = 0.999,
        final_tau: float = 0.999,
        **kwargs: Any,
    ):
        super().__init__(base_tau=base_tau, final_tau=final_tau, **kwargs)
        if queue_size < 1 or not temperature > 0:
            raise ValueError(
                f"model.queue_size must be >= 1 and model.temperature > 0, got {queue_size}, {temperature}"
            )
        self.projector = mlp_head(self.feature_dim, proj_hidden_dim, proj_output_dim, batch_norm=False)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.momentum_projector = momentum_copy(self.projector)
        generator = torch.Generator().manual_seed(0)  # not the global generator: weights stay as without a queue
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_output_dim, generator=generator), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        batch = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if stage == "fit" and batch and self.hparams.queue_size % batch:
            raise ValueError(f"model.queue_size={self.hparams.queue_size} is not a multiple of data.batch_size={batch}")

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    @torch.no_grad()
    def all_keys(self, images: Tensor) -> Tensor:
        """Normalised keys of every rank's images, rank-major, each encoded in a shuffled batch (shuffle-BN)."""
        rank, world = distributed_rank_and_world()
        if world == 1:
            return F.normalize(self.momentum_projector(self.momentum_encoder(images)), dim=1)
        gathered = gather_without_grad(images)
        generator = torch.Generator().manual_seed(self.global_step)
        order = torch.randperm(gathered.shape[0], generator=generator).to(images.device)
        mine = order.view(world, -1)[rank]
        keys = gather_without_grad(F.normalize(self.momentum_projector(self.momentum_encoder(gathered[mine])), dim=1))
        return torch.empty_like(keys).index_copy_(0, order, keys)  # row order[j] of the batch is keys[j]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        ptr, n = int(self.queue_ptr), keys.shape[0]
        self.queue[ptr : ptr + n] = keys
        self.queue_ptr.fill_((ptr + n) % self.queue.shape[0])

    def contrast(self, query_images: Tensor, keys: Tensor) -> Tensor:
        q = F.normalize(self.projector(self.encoder(query_images)), dim=1)
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ self.queue.clone().T], dim=1)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits / self.hparams.temperature, labels)

    def method_loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        """The first view is the query, the second the key (as the authors); the keys then enter the queue."""
        rank, _ = distributed_rank_and_world()
        n = view1.shape[0]
        keys = self.all_keys(view2)
        loss = self.contrast(view1, keys[rank * n : (rank + 1) * n])
        self.enqueue(keys)
        return loss
