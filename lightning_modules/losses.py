"""Contrastive losses with cross-rank gathering (SimCLR NT-Xent, CLIP).

Both losses see the negatives of the *global* batch. The features of other ranks are gathered **with gradient**
(``torch.distributed.nn.functional.all_gather`` sums the incoming gradients back to their owner in backward), and
each rank's loss is the mean over its *local* rows only. With DDP's gradient averaging this makes the update equal
to the single-process update on the whole global batch. Gathering without gradient (CleanCLIP's code) drops the
gradient that flows through the other ranks' copies of a rank's features; ``gather_with_grad=False`` keeps that
behaviour available for comparisons and tests.

All ranks must call the loss with the same local batch size (all_gather needs equal shapes; the data layer gives
every rank the same number of equal batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the autograd graph; identity when not distributed.

    In backward, each rank receives the sum over ranks of the gradients w.r.t. its own slice.
    """
    _, world = distributed_rank_and_world()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_without_grad(x: Tensor) -> Tensor:
    """All-gather that cuts the graph for the other ranks' slices (CleanCLIP-style), keeping the local slice's.

    Only for comparisons: gradients through other ranks' copies of this rank's features are lost.
    """
    rank, world = distributed_rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross-entropy over the global batch.

    ``forward(z1, z2)`` takes the projections of the two views of the same ``n`` local samples (not necessarily
    normalised). With ``N`` the global batch size, each of the ``2n`` local rows has its other view as positive and
    the other ``2N - 2`` samples of all ranks as negatives. The loss is the mean over the local rows.

    Args:
        temperature: softmax temperature (SimCLR CIFAR-10: 0.5).
        gather: use the negatives of all ranks (False: only this rank's batch).
        gather_with_grad: keep the gradient through the gathered features (must stay True for correct DDP
            gradients; False reproduces the no-gradient gather of CleanCLIP-style code).
    """

    def __init__(self, temperature: float = 0.5, gather: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather = gather
        self.gather_with_grad = gather_with_grad

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"NTXentLoss: z1 and z2 must be [n, d] with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        rank, world = distributed_rank_and_world()
        if not self.gather or world == 1:
            rank, world = 0, 1
            all1, all2 = z1, z2
        else:
            gather = gather_with_grad if self.gather_with_grad else gather_without_grad
            all1, all2 = gather(z1), gather(z2)

        n = z1.shape[0]
        n_global = all1.shape[0]
        keys = torch.cat([all1, all2], dim=0)  # [2N, d]: view-1 rows then view-2 rows, rank-major within each
        queries = torch.cat([z1, z2], dim=0)  # [2n, d]
        logits = queries @ keys.T / self.temperature

        # global index of each local sample in the view-1 block of `keys`
        own = torch.arange(n, device=z1.device) + rank * n
        self_index = torch.cat([own, own + n_global])
        positive_index = torch.cat([own + n_global, own])
        rows = torch.arange(2 * n, device=z1.device)
        logits[rows, self_index] = float("-inf")  # a sample is never its own negative
        return F.cross_entropy(logits, positive_index)


class RankAwareClipLoss(ClipLoss):
    """open_clip's ``ClipLoss`` that reads rank and world size from ``torch.distributed`` at each call.

    A LightningModule builds its loss in ``__init__``, before the process group exists; reading rank/world lazily
    avoids freezing ``world_size=1`` there. The computation is open_clip's own.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *args, **kwargs):
        rank, world = distributed_rank_and_world()
        if (rank, world) != (self.rank, self.world_size):
            self.rank, self.world_size = rank, world
            self.labels = {}  # cached labels carry the rank offset
            self.prev_num_logits = 0
        return super().forward(image_features, text_features, logit_scale, *args, **kwargs)


def clip_loss(local_loss: bool = True, gather_with_grad: bool = True, cache_labels: bool = True) -> ClipLoss:
    """open_clip's symmetric InfoNCE loss, for the current (or future) process group.

    Defaults are the setting whose DDP gradient equals the single-process gradient on the global batch:
    ``local_loss=True`` (each rank scores only its own rows against all gathered columns) with
    ``gather_with_grad=True``.
    """
    rank, world = distributed_rank_and_world()
    return RankAwareClipLoss(
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        cache_labels=cache_labels,
        rank=rank,
        world_size=world,
    )
