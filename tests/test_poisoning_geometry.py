"""Crop geometry: the exact position counting is right, and NA's layout beats SSLBKD's and CorruptEncoder's."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from poisoning.geometry import (
    Layout,
    corrupt_encoder_sampler,
    draw_crop,
    estimate,
    fallback_crop,
    main,
    na_sampler,
    sslbkd_sampler,
    two_region_sampler,
    view_events_at,
    view_probabilities,
)


def brute_force(layout: Layout, w: int, h: int, tau: float) -> tuple[float, float, float]:
    width, height = layout.canvas
    events = [
        view_events_at(layout, (x, y, x + w, y + h), tau) for x in range(width - w + 1) for y in range(height - h + 1)
    ]
    return tuple(float(np.mean([e[i] for e in events])) for i in range(3))


def test_position_counting_matches_enumeration():
    rng = random.Random(0)
    layouts = [
        two_region_sampler(64, 32, 32, 8)(0),
        na_sampler(32, 0)(3),
        corrupt_encoder_sampler(32, 1)(5),
        sslbkd_sampler(32, 2)(7),
    ]
    for _ in range(30):  # random layouts, including ones where the reference does not span the height
        width, height = rng.randint(20, 60), rng.randint(20, 40)
        rx0, ry0 = rng.randint(0, width - 5), rng.randint(0, height - 5)
        rx1, ry1 = rng.randint(rx0 + 1, width), rng.randint(ry0 + 1, height)
        t = rng.randint(1, 8)
        tx0, ty0 = rng.randint(0, width - t), rng.randint(0, height - t)
        layouts.append(Layout((width, height), (rx0, ry0, rx1, ry1), (tx0, ty0, tx0 + t, ty0 + t)))
    for layout in layouts:
        width, height = layout.canvas
        for _ in range(4):
            w, h = rng.randint(1, width), rng.randint(1, height)
            for tau in (0.9, 0.5):
                assert view_probabilities(layout, w, h, tau) == pytest.approx(brute_force(layout, w, h, tau), abs=1e-12)


def test_crops_come_from_torchvision_get_params():
    torch.manual_seed(11)
    expected = [RandomResizedCrop.get_params(torch.zeros(1, 32, 64), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(50)]
    torch.manual_seed(11)
    got = [draw_crop(64, 32, (0.2, 1.0), (3 / 4, 4 / 3), "torchvision")[:4] for _ in range(50)]
    assert got == expected
    # On a 3:1 canvas most draws do not fit and some crops are the central fallback.
    torch.manual_seed(0)
    crops = [draw_crop(96, 32, (0.2, 1.0), (3 / 4, 4 / 3), "torchvision") for _ in range(300)]
    assert any(not placed for *_, placed in crops)
    assert all(c[:4] == fallback_crop(96, 32, (3 / 4, 4 / 3)) for c in crops if not c[4])


def test_noisy_alignment_layout_beats_sslbkd_and_corrupt_encoder():
    trials, seed, r = 12000, 0, 32
    na, _ = estimate("NA", na_sampler(r, seed), trials, seed, native_side=r)
    sslbkd, _ = estimate("SSLBKD", sslbkd_sampler(r, seed), trials, seed, native_side=r)
    ce, _ = estimate("CorruptEncoder", corrupt_encoder_sampler(r, seed), trials, seed, native_side=r)
    # SSLBKD's trigger sits on the target image itself: a trigger view free of target content cannot happen.
    assert sslbkd.p_pair == 0.0
    assert na.p_pair > 0.03 and na.p_pair > 10 * na.stderr
    # CorruptEncoder is close (its layout is NA's without the centred trigger); the gap is still many s.e. wide.
    margin = na.p_pair - ce.p_pair
    assert margin > 5 * math.hypot(na.stderr, ce.stderr), (na, ce)
    assert na.p_pair_native > ce.p_pair_native


def test_trigger_at_the_shadow_centre_beats_the_corner():  # Theorem 1 in the measured setting
    centred, _ = estimate("centre", two_region_sampler(64, 32, 32, 8), 3000, 0)
    corner, _ = estimate("corner", two_region_sampler(64, 32, 32, 8, at="corner"), 3000, 0)
    assert centred.p_pair > 10 * corner.p_pair


def test_cli_prints_a_table(capsys):
    main(["--trials", "40", "--image-sizes", "32", "--seed", "1"])
    out = capsys.readouterr().out
    assert "trials per layout: 40, seed: 1" in out
    assert "| 32 | NA (r x 2r, 4 arrangements) | 64 x 32 | 8 |" in out
    assert out.count("\n| 32 |") == 13
    with pytest.raises(SystemExit):
        main(["--trials", "0"])
