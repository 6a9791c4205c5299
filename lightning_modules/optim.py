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

    ``foreach``: the same update vectorised over each parameter group with ``torch._foreach_*`` (True), one
    parameter at a time (False), or torch's rule (None: vectorised when every parameter is on a GPU).
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
        foreach: bool | None = None,
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
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            foreach = group.get("foreach")  # absent from the groups of checkpoints made before the option
            if foreach is None:  # torch's own rule: the vectorised path when every tensor is on a GPU
                foreach = all(p.is_cuda for p in params)
            (self._group_step_foreach if foreach else self._group_step_loop)(group, params)
        return loss

    def _excluded(self, group: dict, p: torch.Tensor) -> bool:
        return group["lars_exclude"] or (group["exclude_bias_and_norm"] and p.ndim <= 1)

    def _group_step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        """One parameter at a time (the reference the vectorised step is tested against)."""
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            grad = p.grad
            if self._excluded(group, p):
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

    def _group_step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """The same update with ``torch._foreach_*`` over the whole group: a handful of kernels per group instead of
        ~10 per parameter (a ResNet-18 has 62 parameters, so ~600 small launches per step on a GPU). The trust
        ratios are computed for all adapted parameters at once from ``_foreach_norm``; no host synchronisation."""
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        adapted = [i for i, p in enumerate(params) if not self._excluded(group, p)]
        updates = list(grads)  # excluded parameters: the gradient itself
        if adapted:
            a_params = [params[i] for i in adapted]
            a_grads = [grads[i] for i in adapted]
            p_norm = torch.stack(torch._foreach_norm(a_params))
            g_norm = torch.stack(torch._foreach_norm(a_grads))
            trust = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
            trust = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
            if group["clip_lr"] and lr > 0:
                trust = torch.clamp(trust / lr, max=1.0)
            scaled = torch._foreach_add(a_grads, a_params, alpha=wd)
            torch._foreach_mul_(scaled, list(trust.to(scaled[0].dtype).unbind()))
            for i, update in zip(adapted, scaled):
                updates[i] = update
        if momentum > 0:
            states = [self.state[p] for p in params]
            fresh = [i for i, state in enumerate(states) if "momentum_buffer" not in state]
            for i in fresh:
                states[i]["momentum_buffer"] = updates[i].detach().clone()
            fresh_set = set(fresh)
            old = [i for i in range(len(states)) if i not in fresh_set]
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [updates[i] for i in old])
            bufs = [state["momentum_buffer"] for state in states]
            updates = torch._foreach_add(updates, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, updates, alpha=-lr)


OPTIMIZER_IMPLS = ("auto", "for-loop", "foreach", "fused")


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    impl: str = "auto",
) -> Optimizer:
    """``sgd`` / ``lars`` / ``adam`` / ``adamw`` over ``groups``, with the implementation ``impl``:

    * ``auto``: torch's own choice (the vectorised ``foreach`` path when every parameter is on a GPU, else one
      parameter at a time); LARS follows the same rule;
    * ``for-loop``: one parameter at a time everywhere (the reference);
    * ``foreach``: ``torch._foreach_*`` over each parameter group (all four; LARS's own vectorised step);
    * ``fused``: one fused kernel per step (torch's ``fused=True``: SGD, Adam, AdamW on CUDA and CPU); LARS has
      none and is refused here, by name.

    All give the same updates to float rounding (``tests/test_optim_speed.py``).
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"model.optimizer_impl: {impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
    if name == "lars":
        if impl == "fused":
            raise ValueError("model.optimizer_impl: 'fused' has no LARS implementation; use 'foreach' for LARS")
        foreach = {"auto": None, "for-loop": False, "foreach": True}[impl]
        return LARS(groups, lr=lr, momentum=momentum, foreach=foreach)
    kinds = {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kinds)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, **kinds)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kinds)
    raise ValueError(f"model.optimizer: {name!r} is not one of sgd, lars, adam, adamw")


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
