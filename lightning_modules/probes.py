"""Linear probes on frozen, pre-computed features, and the stratified label subsets of the NA protocol."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_features_labels(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"fit_linear_probe: train_features must be [N, D], got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"fit_linear_probe: train_labels must be [N] with N={features.shape[0]}, got {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("fit_linear_probe: no training features")
    if num_classes < 2:
        raise ValueError(f"fit_linear_probe: num_classes must be >= 2, got {num_classes}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"fit_linear_probe: train_labels must lie in [0, {num_classes})")


def probe_epochs_run(n: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """The epochs ``fit_linear_probe`` runs on ``n`` images: ``epochs``, or more to make ``min_steps`` steps."""
    steps_per_epoch = -(-n // batch_size)
    return max(epochs, -(-min_steps // steps_per_epoch))


def fit_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 40,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    decay_epochs: Sequence[float] = (0.6, 0.8),
    min_steps: int = 0,
    seed: int = 0,
) -> nn.Linear:
    """Multinomial logistic regression on frozen features; returns an ``nn.Linear`` that takes RAW features.

    The defaults are the NA authors' linear evaluation: SGD, lr 0.01, momentum 0.9, 40 epochs, the rate divided by
    10 at 60% and 80% of the epochs (``decay_epochs``, fractions of ``epochs``: step decay). Features are normalised
    per dimension (train mean/std) for the fit and the normalisation is folded into the returned layer's weight and
    bias. Zero-initialised weights; mini-batches shuffled by a generator seeded with ``seed`` (the global RNG is untouched), so the result
    is a function of the inputs and ``seed``.

    ``min_steps``: train for more epochs than ``epochs`` when they would give fewer optimiser steps (the decay
    points scale with them). 40 epochs of CIFAR-10's 5,000 probe images at batch 32 are 6,250 steps; on the
    built-in shapes' 500 they are 640, and the probe is still far from converged there (benchmarks/linear_probe.py).
    """
    _check_features_labels(train_features, train_labels, num_classes)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"fit_linear_probe: need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    if any(not 0 < f <= 1 for f in decay_epochs):
        raise ValueError(f"fit_linear_probe: decay_epochs are fractions of the epochs in (0, 1], got {decay_epochs}")
    features = train_features.detach().float()
    labels = train_labels.detach().long().to(features.device)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    standardised = (features - mean) / std

    n, dim = standardised.shape
    probe = nn.utils.skip_init(nn.Linear, dim, num_classes, device=features.device)  # no draw from the global RNG
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    epochs = probe_epochs_run(n, epochs, batch_size, min_steps)
    milestones = sorted({max(1, round(f * epochs)) for f in decay_epochs})
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)  # stepped per epoch
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(features.device)
            for batch in order.split(batch_size):
                loss = F.cross_entropy(probe(standardised[batch]), labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            schedule.step()

    with torch.no_grad():  # W (x - mean) / std + b  ==  (W / std) x + (b - (W / std) mean)
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)


def label_fraction_subset(labels: Tensor | Sequence[int], fraction: float, seed: int) -> Tensor:
    """Sorted indices of a class-stratified random subset holding ``fraction`` of each class's samples.

    Each class keeps ``round(fraction * n_class)`` samples, at least one. The NA protocol trains the linear probe
    on 10% of the labels (``fraction=0.1``).
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"label_fraction_subset: labels must be 1-D, got shape {tuple(labels.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction_subset: fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels.cpu()):  # sorted, so the draw order does not depend on label order
        members = torch.nonzero(labels.cpu() == cls).flatten()
        keep = max(1, round(fraction * members.numel()))
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:keep]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)
