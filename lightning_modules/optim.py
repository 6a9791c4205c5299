"""Optimisation pieces: LARS (SimCLR), AdamW parameter groups without decay on gains/biases (open_clip's rule), and
a warmup-cosine factor for ``LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

# open_clip's training/main.py: no weight decay for ndim < 2 parameters and names containing any of these
NO_DECAY_NAME_PARTS: tuple[str, ...] = ("bn", "ln", "bias", "logit_scale")


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used for SimCLR / solo-learn.

    For each parameter that is not excluded, with gradient ``g`` and weight decay ``wd``:

        trust = eta * ||p|| / (||g|| + wd * ||p|| + eps)      (1 when ||p|| or ||g|| is 0)
        trust = min(trust / lr, 1)                             (only with ``clip_lr``: the local lr never exceeds lr)
        d     = trust * (g + wd * p)

    Excluded parameters (1-D ones such as biases and norm gains when ``exclude_bias_and_norm``; every parameter of
    a group with ``lars_exclude=True``) get neither adaptation nor weight decay: ``d = g``. Then, as in SGD,
    ``buf = momentum * buf + d`` (``buf = d`` at the first step), ``p -= lr * buf`` (Nesterov: ``d + momentum * buf``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        eps: float = 1e-8,
        clip_lr: bool = False,
        exclude_bias_and_norm: bool = True,
        nesterov: bool = False,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)):
            if value < 0:
                raise ValueError(f"LARS: {name} must be >= 0, got {value}")
        if not eta > 0:
            raise ValueError(f"LARS: eta (trust coefficient) must be > 0, got {eta}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            eps=eps,
            clip_lr=clip_lr,
            exclude_bias_and_norm=exclude_bias_and_norm,
            nesterov=nesterov,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                excluded = group["lars_exclude"] or (group["exclude_bias_and_norm"] and p.ndim <= 1)
                if excluded:
                    update = grad
                else:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    trust = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    if group["clip_lr"] and lr > 0:
                        trust = torch.clamp(trust / lr, max=1.0)
                    update = grad.add(p, alpha=wd).mul_(trust)
                if momentum > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(update)
                    buf = state["momentum_buffer"]
                    update = update.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(update, alpha=-lr)
        return loss


def no_weight_decay(name: str, param: torch.Tensor, skip: Iterable[str] = NO_DECAY_NAME_PARTS) -> bool:
    """open_clip's rule: gains, biases and the logit scale are not decayed (``ndim < 2`` or a name part matches)."""
    return param.ndim < 2 or any(part in name for part in skip)


def param_groups_no_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = NO_DECAY_NAME_PARTS
) -> list[dict]:
    """Two parameter groups for AdamW/SGD/LARS: decayed weights, and the rest with ``weight_decay=0``.

    Follows open_clip's ``exclude`` rule (``p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name``): biases, norm
    gains, ``logit_scale`` and 1-D embeddings such as the ViT ``class_embedding`` are not decayed; 2-D embeddings
    (``positional_embedding``, ``token_embedding.weight``) are. Frozen parameters are left out; empty groups dropped.
    The no-decay group is marked ``lars_exclude=True`` so that ``LARS`` also skips its adaptation.
    """
    skip = tuple(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param, skip) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, base: float, final: float = 0.0) -> float:
    """Learning-rate FACTOR at ``step`` (relative to the peak ``base``) for linear warmup then cosine decay.

    The rate rises linearly to ``base`` over ``warmup_steps`` (``base * (step + 1) / warmup_steps``, open_clip's
    warmup), then follows a half cosine from ``base`` down to ``final`` at ``total_steps`` and stays there. Use with
    ``LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=..., total_steps=..., base=lr, final=...))``
    where the optimizer was built with ``lr=base``.
    """
    if not base > 0:
        raise ValueError(f"warmup_cosine: base learning rate must be > 0, got {base}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(
            f"warmup_cosine: need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min((step - warmup_steps) / decay_steps, 1.0) if decay_steps > 0 else 1.0
    lr = final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))
    return lr / base
