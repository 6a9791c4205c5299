"""How often two random crops of a poisoned image split it the way an attack needs: a Monte-Carlo estimate.

SimCLR draws two independent views with torchvision's ``RandomResizedCrop`` (scale (0.2, 1), ratio (3/4, 4/3)).
For a poisoned canvas with a reference region R (target-class content) and a trigger box T (pixel boxes, x1/y1
exclusive), a view with crop box C is a

- **trigger view** when C contains all of T and no pixel of R (the trigger on shadow / "noise" content only);
- **reference view** when C holds no pixel of T and at least ``tau`` of C's area lies in R (default tau = 0.9:
  "mostly reference").

A **noisy-alignment pair** is one trigger view and one reference view among the two views of an image. A view
cannot be both, so for two independent views P(pair) = a1 b2 + a2 b1. A **co-occurrence pair** relaxes the
trigger view to "contains T" (reference pixels allowed), the event SSLBKD-style attacks rely on. The
**native-scale** variant also asks both views to fit in an r x r square (r = the image size), so that, resized to
r, the trigger and the reference appear at least as large as in a normal training image.

Estimator: for every poisoned image (trial) the layout comes from the attack's own record code and the two crop
sizes from ``RandomResizedCrop.get_params`` itself (the loader's code path, retries and central fallback
included, under a fixed torch seed). get_params places a crop of a given size uniformly over all integer
positions, so the probability of each event given the size is counted exactly over those positions (and the
fallback crop, which is not placed at random, is evaluated where it is). Averaging these conditional
probabilities over trials is unbiased and has far lower variance than counting events of sampled positions.

Run: ``python -m poisoning.geometry --trials 20000 --seed 0`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

from poisoning.base import PlanContext
from poisoning.corruptencoder import CorruptEncoder
from poisoning.noisy_alignment import NoisyAlignment
from poisoning.plan import Box
from poisoning.sslbkd import SSLBKD
from poisoning.triggers import default_trigger_size

DEFAULT_SCALE = (0.2, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_TAU = 0.9


@dataclass(frozen=True)
class Layout:
    """One poisoned canvas: size (w, h), reference region, trigger box (pixels, x1/y1 exclusive)."""

    canvas: tuple[int, int]
    reference: Box
    trigger: Box


LayoutSampler = Callable[[int], Layout]  # trial index -> layout (fixed or drawn per trial)


@dataclass(frozen=True)
class Estimate:
    name: str
    description: str
    canvas: tuple[int, int]
    trigger_px: int
    trials: int
    p_trigger_view: float
    p_reference_view: float
    p_pair: float
    stderr: float
    p_pair_native: float
    p_cooccurrence: float


CROP_MODELS = ("torchvision", "single-draw")


def single_draw_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """An idealised crop for the ablation: ONE draw of RandomResizedCrop's area and log-ratio, the crop's sides
    clamped to the canvas (no retries, no central fallback). Returns (top, left, h, w) like get_params."""
    area = width * height
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w = min(width, max(1, int(round(math.sqrt(target_area * aspect)))))
    h = min(height, max(1, int(round(math.sqrt(target_area / aspect)))))
    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
    return top, left, h, w


def fallback_crop(width: int, height: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """The central crop get_params returns after 10 failed draws, as (top, left, h, w)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], crop_model: str
) -> tuple[int, int, int, int, bool]:
    """One crop (top, left, h, w, placed_at_random) from the global torch RNG."""
    if crop_model == "torchvision":
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params only reads the size
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
        # A random draw of exactly the fallback size that also lands on the centre is counted as the fallback:
        # a negligible approximation (it only changes how that one crop's position is averaged).
        return top, left, h, w, (top, left, h, w) != fallback_crop(width, height, ratio)
    if crop_model == "single-draw":
        return (*single_draw_params(width, height, scale, ratio), True)
    raise ValueError(f"crop_model={crop_model!r}: choose one of {', '.join(CROP_MODELS)}")


def _overlap_1d(starts: np.ndarray, length: int, low: int, high: int) -> np.ndarray:
    return np.clip(np.minimum(starts + length, high) - np.maximum(starts, low), 0, None)


def _pairs_at_least(a: np.ndarray, b: np.ndarray, threshold: float) -> int:
    """Number of (i, j) with a[i] * b[j] >= threshold > 0, for non-negative integer arrays."""
    a = a[a > 0].astype(np.float64)
    if a.size == 0 or b.size == 0:
        return 0
    b = np.sort(b)
    need = np.ceil(threshold / a)
    need = np.where(a * (need - 1) >= threshold, need - 1, need)  # guard float rounding of the division
    need = np.where(a * need < threshold, need + 1, need)
    return int((b.size - np.searchsorted(b, need, side="left")).sum())


def view_probabilities(layout: Layout, w: int, h: int, tau: float = DEFAULT_TAU) -> tuple[float, float, float]:
    """(P(trigger view), P(reference view), P(holds the trigger)) of a w x h crop placed uniformly at random.

    Counted exactly: every event is a product of per-axis interval conditions, or (for "mostly in R") a threshold
    on the product of the per-axis overlaps with R.
    """
    width, height = layout.canvas
    rx0, ry0, rx1, ry1 = layout.reference
    tx0, ty0, tx1, ty1 = layout.trigger
    xs, ys = np.arange(width - w + 1), np.arange(height - h + 1)
    positions = xs.size * ys.size
    ox, oy = _overlap_1d(xs, w, rx0, rx1), _overlap_1d(ys, h, ry0, ry1)
    hold_x, hold_y = (xs <= tx0) & (xs + w >= tx1), (ys <= ty0) & (ys + h >= ty1)
    touch_x, touch_y = _overlap_1d(xs, w, tx0, tx1) > 0, _overlap_1d(ys, h, ty0, ty1) > 0
    holds = int(hold_x.sum()) * int(hold_y.sum())
    holds_touching_r = int((hold_x & (ox > 0)).sum()) * int((hold_y & (oy > 0)).sum())
    threshold = tau * w * h
    mostly_r = _pairs_at_least(ox, oy, threshold)
    mostly_r_touching_t = _pairs_at_least(ox[touch_x], oy[touch_y], threshold)
    return (holds - holds_touching_r) / positions, (mostly_r - mostly_r_touching_t) / positions, holds / positions


def view_events_at(layout: Layout, crop: Box, tau: float = DEFAULT_TAU) -> tuple[bool, bool, bool]:
    """(trigger view, reference view, holds the trigger) of one placed crop box."""

    def overlap(a: Box, b: Box) -> int:
        return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))

    reference, trigger = layout.reference, layout.trigger
    area = (crop[2] - crop[0]) * (crop[3] - crop[1])
    in_reference = overlap(crop, reference)
    holds = crop[0] <= trigger[0] and crop[1] <= trigger[1] and crop[2] >= trigger[2] and crop[3] >= trigger[3]
    return holds and in_reference == 0, overlap(crop, trigger) == 0 and in_reference >= tau * area, holds


def estimate(
    name: str,
    sampler: LayoutSampler,
    trials: int,
    seed: int,
    *,
    description: str = "",
    tau: float = DEFAULT_TAU,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    native_side: int | None = None,
    crop_model: str = "torchvision",
) -> tuple[Estimate, np.ndarray]:
    """The estimate for one layout and the per-trial P(pair | layout, crop sizes) (for paired comparisons)."""
    cache: dict[tuple, tuple[float, float, float]] = {}
    per_view = np.empty((trials, 2, 3))  # trigger view, reference view, holds trigger
    native = np.empty((trials, 2), dtype=bool)
    first: Layout | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for trial in range(trials):
            layout = sampler(trial)
            first = first or layout
            width, height = layout.canvas
            side = native_side if native_side is not None else min(width, height)
            for view in range(2):
                top, left, h, w, at_random = draw_crop(width, height, scale, ratio, crop_model)
                if at_random:
                    key = (layout, w, h)
                    if key not in cache:
                        cache[key] = view_probabilities(layout, w, h, tau)
                    per_view[trial, view] = cache[key]
                else:
                    per_view[trial, view] = view_events_at(layout, (left, top, left + w, top + h), tau)
                native[trial, view] = w <= side and h <= side
    a, b, held = per_view[..., 0], per_view[..., 1], per_view[..., 2]
    pair = a[:, 0] * b[:, 1] + a[:, 1] * b[:, 0]
    an, bn = a * native, b * native
    pair_native = an[:, 0] * bn[:, 1] + an[:, 1] * bn[:, 0]
    cooccurrence = held[:, 0] * b[:, 1] + held[:, 1] * b[:, 0]
    assert first is not None
    return Estimate(
        name=name,
        description=description,
        canvas=first.canvas,
        trigger_px=first.trigger[2] - first.trigger[0],
        trials=trials,
        p_trigger_view=float(a.mean()),
        p_reference_view=float(b.mean()),
        p_pair=float(pair.mean()),
        stderr=float(pair.std(ddof=1) / math.sqrt(trials)) if trials > 1 else float("nan"),
        p_pair_native=float(pair_native.mean()),
        p_cooccurrence=float(cooccurrence.mean()),
    ), pair


# -- layouts ---------------------------------------------------------------------------------------------------
def _context(r: int) -> PlanContext:
    return PlanContext(image_size=r, target_index=0, target_name=None, pool=("reference",))


def attack_sampler(attack, r: int) -> LayoutSampler:
    """Layouts exactly as the attack's plan lays out key ``trial-<i>`` (reference box = target-class region)."""
    context = _context(r)

    def sample(index: int) -> Layout:
        record = attack._record(f"trial-{index}", context)
        return Layout(tuple(record.canvas_size), tuple(record.reference_box), tuple(record.trigger_box))

    return sample


def na_sampler(r: int, seed: int, **kwargs) -> LayoutSampler:
    return attack_sampler(NoisyAlignment(target_class=0, count=0, seed=seed, reference_dir=None, **kwargs), r)


def sslbkd_sampler(r: int, seed: int) -> LayoutSampler:
    return attack_sampler(SSLBKD(target_class=0, count=0, seed=seed), r)


def corrupt_encoder_sampler(r: int, seed: int) -> LayoutSampler:
    return attack_sampler(CorruptEncoder(target_class=0, count=0, seed=seed), r)


def two_region_sampler(
    width: int, height: int, reference_width: int, trigger: int, *, at: str = "centre"
) -> LayoutSampler:
    """A fixed layout: reference = the left ``reference_width`` columns, shadow = the rest; the trigger at the
    shadow's centre (``at="centre"``) or in its far corner (``at="corner"``)."""
    shadow = (reference_width, 0, width, height)
    if at == "centre":
        x0 = shadow[0] + (shadow[2] - shadow[0] - trigger) // 2
        y0 = (height - trigger) // 2
    elif at == "corner":
        x0, y0 = width - trigger, height - trigger
    else:
        raise ValueError(f"at={at!r}: choose centre or corner")
    layout = Layout((width, height), (0, 0, reference_width, height), (x0, y0, x0 + trigger, y0 + trigger))
    return lambda index: layout


def standard_layouts(r: int, seed: int) -> list[tuple[str, str, LayoutSampler]]:
    """(name, description, sampler) of every layout in the report, at square side r."""
    t = default_trigger_size(r)
    layouts = [
        (
            "NA (r x 2r, 4 arrangements)",
            "poisoning.NoisyAlignment records: shadow r x r, trigger at its centre (+-5% jitter), random side",
            na_sampler(r, seed),
        ),
        ("SSLBKD", "poisoning.SSLBKD records: r x r target image, trigger anywhere", sslbkd_sampler(r, seed)),
        (
            "CorruptEncoder",
            "poisoning.CorruptEncoder records: r x 2r, object r x r at an edge (+0-5% inset), "
            "trigger random in the middle band of the other half",
            corrupt_encoder_sampler(r, seed),
        ),
        (
            "T1: r x 2r, trigger exactly centred",
            "reference left, trigger at the shadow's exact centre",
            two_region_sampler(2 * r, r, r, t),
        ),
        (
            "T1: r x 2r, trigger in the corner",
            "trigger in the shadow's far corner",
            two_region_sampler(2 * r, r, r, t, at="corner"),
        ),
    ]
    for shadow in (0.5, 1.25, 1.5, 2.0):  # Theorem 2 family: the reference keeps its r x r, the shadow's width varies
        width = r + round(shadow * r)
        layouts.append(
            (
                f"T2: r x {1 + shadow:g}r, r x r reference",
                f"shadow {shadow:g}r x r, trigger at its centre",
                two_region_sampler(width, r, r, t),
            )
        )
    for factor in (1.0, 1.5, 3.0, 4.0):  # both regions stretched to equal halves of a wider canvas
        width = round(factor * r)
        layouts.append(
            (
                f"halves: r x {factor:g}r",
                f"reference and shadow {factor / 2:g}r x r each",
                two_region_sampler(width, r, width // 2, t),
            )
        )
    return layouts


def run(
    image_sizes: Sequence[int],
    trials: int,
    seed: int,
    tau: float = DEFAULT_TAU,
    scale: Sequence[float] = DEFAULT_SCALE,
    crop_model: str = "torchvision",
) -> list[tuple[int, Estimate]]:
    results = []
    for r in image_sizes:
        for name, description, sampler in standard_layouts(r, seed):
            result, _ = estimate(
                name,
                sampler,
                trials,
                seed,
                description=description,
                tau=tau,
                scale=scale,
                native_side=r,
                crop_model=crop_model,
            )
            results.append((r, result))
    return results


def markdown_table(results: Sequence[tuple[int, Estimate]]) -> str:
    lines = [
        "| r | layout | canvas (w x h) | trigger px | P(trigger view) | P(reference view) | P(NA pair) ± s.e. "
        "| P(NA pair, native scale) | P(co-occurrence pair) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, e in results:
        lines.append(
            f"| {r} | {e.name} | {e.canvas[0]} x {e.canvas[1]} | {e.trigger_px} | {e.p_trigger_view:.4f} "
            f"| {e.p_reference_view:.4f} | {e.p_pair:.4f} ± {e.stderr:.4f} | {e.p_pair_native:.4f} "
            f"| {e.p_cooccurrence:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20000, help="poisoned images (pairs of views) per layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help="share of a reference view inside R")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--scale", type=float, nargs=2, default=list(DEFAULT_SCALE), help="RandomResizedCrop scale")
    parser.add_argument("--crop-model", choices=CROP_MODELS, default="torchvision")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if not 0.0 < args.tau <= 1.0:
        parser.error("--tau must be in (0, 1]")
    if not 0.0 < args.scale[0] <= args.scale[1] <= 1.0:
        parser.error("--scale must be two numbers 0 < low <= high <= 1")
    results = run(args.image_sizes, args.trials, args.seed, args.tau, args.scale, args.crop_model)
    print(
        f"trials per layout: {args.trials}, seed: {args.seed}, tau: {args.tau}, crops: {args.crop_model}, "
        f"scale {tuple(args.scale)}, ratio (3/4, 4/3)"
    )
    print(markdown_table(results))


if __name__ == "__main__":
    main()
