"""Neural-Cleanse-style trigger inversion for one target class, and how an inverted trigger compares with the real one.

MCLDef's first stage (Wang et al. 2019, Neural Cleanse): find a mask ``m`` (one channel, image-sized) and a
pattern ``p`` (RGB) such that stamping them on clean images, ``x' = (1 - m) * x + m * p`` in pixel space, makes the
backdoored classifier say the target class, with ``m`` as small as possible:

    min_{m, p}  CE(f(x'), target) + cost * ||m||_1

Both are sigmoid-parameterised so they stay in [0, 1]. ``cost`` follows Neural Cleanse's schedule: raised by 1.5x
after ``patience`` checks in a row where the stamped images reach ``success_bound``, lowered by 1.5^1.5 after
``patience`` checks in a row that do not; the smallest mask that reached the bound is kept. Given the images'
labels, the inversion draws only images whose label is not the target, so its success (and the bound) counts only
images the trigger had to flip: target-class images, already "target" without any trigger, would inflate it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Classifier = Callable[[Tensor], Tensor]


@dataclass
class InversionConfig:
    """Neural Cleanse's knobs (its defaults: Adam lr 0.1, betas (0.5, 0.9), init cost 1e-3, patience 5)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.1
    init_cost: float = 1e-3
    success_bound: float = 0.99
    check_every: int = 20
    patience: int = 5
    cost_up: float = 1.5
    cost_down: float = 1.5**1.5
    seed: int = 0

    def validate(self, prefix: str = "model.") -> None:
        for name in ("steps", "batch_size", "check_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}inversion_{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"{prefix}inversion_lr must be > 0, got {self.lr}")
        if self.init_cost < 0:
            raise ValueError(f"{prefix}inversion_cost must be >= 0, got {self.init_cost}")
        if not 0 < self.success_bound <= 1:
            raise ValueError(f"{prefix}inversion_success_bound must be in (0, 1], got {self.success_bound}")


@dataclass
class InvertedTrigger:
    """The result: mask [1, H, W] and pattern [3, H, W], both in [0, 1] pixel space, on the CPU."""

    mask: Tensor
    pattern: Tensor
    success: float  # share of the non-target inversion images the stamped trigger sends to the target (kept mask)
    reached_bound: bool
    final_cost: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def mask_l1(self) -> float:
        return float(self.mask.sum())

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (tensors, numbers, lists)."""
        return {
            "mask": self.mask.clone(),
            "pattern": self.pattern.clone(),
            "success": self.success,
            "reached_bound": self.reached_bound,
            "final_cost": self.final_cost,
            "steps": self.steps,
            "history": list(self.history),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InvertedTrigger:
        return cls(**state)


class PixelNormalizer:
    """Between a pipeline's normalised tensors and [0, 1] pixels (the trigger is blended in pixel space)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(self, images: Tensor) -> Tensor:
        return images * self.std.to(images) + self.mean.to(images)

    def from_pixels(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def stamp(self, images: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
        """``(1 - m) * x + m * p`` on normalised ``images`` [B, 3, H, W]; returns normalised images."""
        pixels = self.to_pixels(images)
        mask, pattern = mask.to(pixels), pattern.to(pixels)
        return self.from_pixels((1 - mask) * pixels + mask * pattern)


def invert_trigger(
    classify: Classifier,
    images: Tensor,
    target: int,
    normalizer: PixelNormalizer,
    config: InversionConfig,
    labels: Tensor | None = None,
) -> InvertedTrigger:
    """Neural Cleanse for ``target`` on normalised clean ``images`` [N, 3, H, W] (on the classifier's device).

    With ``labels`` ([N]), only the images whose label is not ``target`` are used: the loss, the success rate and
    the success bound all count images the trigger must flip (a ValueError when there are none).

    ``classify`` maps normalised images to logits and must be frozen (eval mode, ``requires_grad`` off); only the
    mask and pattern are optimised. Mini-batches and the initial mask/pattern come from a generator seeded with
    ``config.seed``: the result is a function of the inputs and the config, and torch's global generator is
    left untouched.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"invert_trigger: need clean images [N, 3, H, W], got shape {tuple(images.shape)}")
    if labels is not None:
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"invert_trigger: {labels.shape[0]} labels for {images.shape[0]} images")
        images = images[labels.to(images.device) != target]
        if images.shape[0] == 0:
            raise ValueError(
                "invert_trigger: every inversion image is of the target class; the trigger needs others to flip"
            )
    device = images.device
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(config.seed)
    # Random start (Neural Cleanse draws both uniformly); logits of uniform draws away from 0 and 1.
    mask_logit = torch.logit(torch.rand(1, height, width, generator=generator).clamp(0.05, 0.95)).to(device)
    pattern_logit = torch.logit(torch.rand(3, height, width, generator=generator).clamp(0.05, 0.95)).to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))

    cost = config.init_cost
    up_count = down_count = 0
    best: tuple[float, Tensor, Tensor, float] | None = None  # (mask L1, mask, pattern, success)
    window_success: list[float] = []
    window_l1: list[float] = []
    history: list[dict[str, float]] = []
    batch = min(config.batch_size, n)
    targets = torch.full((batch,), target, dtype=torch.long, device=device)
    with torch.enable_grad():
        for step in range(1, config.steps + 1):
            index = torch.randint(0, n, (batch,), generator=generator).to(device)
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            logits = classify(normalizer.stamp(images[index], mask, pattern))
            mask_l1 = mask.sum()
            loss = F.cross_entropy(logits, targets) + cost * mask_l1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window_success.append((logits.argmax(1) == targets).float().mean().item())
            window_l1.append(mask_l1.item())
            if step % config.check_every and step != config.steps:
                continue
            success, l1 = float(np.mean(window_success)), float(np.mean(window_l1))
            window_success.clear()
            window_l1.clear()
            history.append({"step": step, "success": success, "mask_l1": l1, "cost": cost})
            if success >= config.success_bound and (best is None or l1 < best[0]):
                with torch.no_grad():
                    best = (l1, torch.sigmoid(mask_logit).cpu(), torch.sigmoid(pattern_logit).cpu(), success)
            # Neural Cleanse's cost schedule: push the mask smaller while the trigger works, relax when it does not.
            if success >= config.success_bound:
                up_count, down_count = up_count + 1, 0
            else:
                up_count, down_count = 0, down_count + 1
            if up_count >= config.patience:
                up_count = 0
                cost = config.init_cost if cost == 0 else cost * config.cost_up
            elif down_count >= config.patience:
                down_count = 0
                cost /= config.cost_down
    if best is None:
        with torch.no_grad():
            mask, pattern = torch.sigmoid(mask_logit).cpu(), torch.sigmoid(pattern_logit).cpu()
        success, reached = history[-1]["success"], False
    else:
        _, mask, pattern, success = best
        reached = True
    return InvertedTrigger(
        mask=mask.detach(),
        pattern=pattern.detach(),
        success=success,
        reached_bound=reached,
        final_cost=cost,
        steps=config.steps,
        history=history,
    )


def trigger_success(
    classify: Classifier,
    images: Tensor,
    labels: Tensor,
    target: int,
    normalizer: PixelNormalizer,
    trigger: InvertedTrigger,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Share of the images whose label is not the target that the stamped trigger sends to the target."""
    hits = total = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk, chunk_labels = images[start : start + batch_size], labels[start : start + batch_size]
            keep = chunk_labels != target
            if not keep.any():
                continue
            logits = classify(normalizer.stamp(chunk[keep], trigger.mask, trigger.pattern))
            hits += int((logits.argmax(1) == target).sum())
            total += int(keep.sum())
    return {"rate": hits / total if total else None, "images": total}


def compare_with_attack_trigger(
    mask: Tensor, box_for_key: Callable[[tuple[int, int], str], tuple[int, int, int, int]], keys: Sequence[str]
) -> dict[str, Any]:
    """Where the inverted mask sits relative to where the attack's test trigger goes.

    ``box_for_key((w, h), key)`` is the attack's test-trigger box on an image of the model's input size (exact for
    square images; pipelines that crop see a shifted box). The boxes of ``keys`` give a placement region (their
    union) and the true trigger area (mean box area). Reported: the mask's L1 (its area in pixels) against that
    area, and the share of the mask's mass inside the region against the region's share of the image (a mask that
    ignores the trigger's place has the two equal).
    """
    mask2d = mask.reshape(mask.shape[-2], mask.shape[-1]).float()
    height, width = mask2d.shape
    density = torch.zeros(height, width)
    areas = []
    for key in keys:
        x0, y0, x1, y1 = box_for_key((width, height), key)
        density[y0:y1, x0:x1] += 1
        areas.append((x1 - x0) * (y1 - y0))
    if not areas:
        raise ValueError("compare_with_attack_trigger: no keys to place the attack's trigger with")
    region = density > 0
    mass = float(mask2d.sum())
    inside = float(mask2d[region].sum()) / mass if mass > 0 else None
    region_fraction = float(region.float().mean())
    true_area = float(np.mean(areas))
    return {
        "mask_l1": mass,
        "true_trigger_area": true_area,
        "mask_l1_over_true_area": mass / true_area if true_area else None,
        "mask_mass_in_trigger_region": inside,
        "trigger_region_image_fraction": region_fraction,
        "mask_mass_lift": inside / region_fraction if inside is not None and region_fraction else None,
        "placements": len(areas),
        "image_size": [width, height],
    }


def save_trigger_pngs(trigger: InvertedTrigger, folder: Path, prefix: str = "mcldef") -> dict[str, str]:
    """``{prefix}_mask.png`` (grey), ``{prefix}_pattern.png`` and ``{prefix}_trigger.png`` (m * p), at input size."""
    folder.mkdir(parents=True, exist_ok=True)

    def to_uint8(array: Tensor) -> np.ndarray:
        return (array.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    mask = trigger.mask.reshape(trigger.mask.shape[-2], trigger.mask.shape[-1])
    images = {
        "mask": Image.fromarray(to_uint8(mask)),
        "pattern": Image.fromarray(to_uint8(trigger.pattern.permute(1, 2, 0))),
        "trigger": Image.fromarray(to_uint8((trigger.mask * trigger.pattern).permute(1, 2, 0))),
    }
    paths = {}
    for name, image in images.items():
        path = folder / f"{prefix}_{name}.png"
        image.save(path)
        paths[name] = str(path)
    return paths
