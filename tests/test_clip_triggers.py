"""The CLIP baselines in ``trigger_mode: benchmark`` reproduce CleanCLIP's / BadCLIP's ``apply_trigger`` on a fixed
input (pixels, noise statistics, the warp field); the controls differ from the real triggers; bad input fails.

The reference pipeline here is written from their definition with torchvision's own ``to_tensor`` / ``to_pil_image``
(the ``ToTensor`` / ``ToPILImage`` their code calls) and PIL's ``resize`` to 224 px.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_pil_image, to_tensor

from poisoning import SIG, BadNet, Blended, CatalogEntry, WaNet
from poisoning.image_text import benchmark_canvas, control_seed

SIDE = 224


def photo(index: int, size: tuple[int, int] = (300, 260)) -> Image.Image:
    """A textured non-square image (so the resize to 224 px matters)."""
    rng = np.random.default_rng(index)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = rng.integers(30, 220, size=(1, 1, 3)) + 60 * x - 40 * y + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def reference_input(image: Image.Image) -> torch.Tensor:
    return to_tensor(image.resize((SIDE, SIDE)))  # their first two lines: resize (PIL default), ToTensor


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def validated(attack, size: int = SIDE):
    attack.validate("image-text", None, size)
    return attack


# -- the canvas -----------------------------------------------------------------------------------------------
def test_benchmark_canvas_is_pils_default_resize():
    image = photo(0)
    assert benchmark_canvas(image, SIDE).tobytes() == image.resize((SIDE, SIDE)).tobytes()


# -- SIG ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["add", "blend"])
def test_sig_reproduces_the_reference_pixels(combine):
    image = photo(1)
    pixels = reference_input(image)
    signal = torch.zeros((3, SIDE, SIDE))
    for j in range(SIDE):
        signal[:, :, j] = (60 / 255) * np.sin(2 * np.pi * j * 6 / 224)
    mixed = signal + pixels if combine == "add" else 0.2 * signal + 0.8 * pixels
    expected = to_pil_image(torch.clip(mixed, 0, 1))
    attack = validated(SIG(target_class="banana", count=1, combine=combine))
    assert as_array(attack.test_trigger(image, "k")).tolist() == as_array(expected).tolist()
    # Training applies the same trigger to the stream's image.
    plan = attack.plan([CatalogEntry("k", None)], None, SIDE, None)
    assert plan.apply({"__key__": "k", "image": image, "text": "x"})["image"].tobytes() == expected.tobytes()


# -- Blended --------------------------------------------------------------------------------------------------
def test_blended_reproduces_the_reference_given_its_noise_and_redraws_it():
    image = photo(2)
    attack = validated(Blended(target_class="banana", count=1, seed=4))
    for key in ("a", "b"):
        noise = torch.from_numpy(attack.noise(key, "test", SIDE))
        expected = to_pil_image(torch.clip(0.2 * noise + 0.8 * reference_input(image), 0, 1))
        assert attack.test_trigger(image, key).tobytes() == expected.tobytes()
        assert attack.test_trigger(image, key).tobytes() == expected.tobytes()  # fixed by (seed, key)
    draws = torch.stack([torch.from_numpy(attack.noise(f"k{i}", "train", SIDE)) for i in range(4)])
    # torch.rand's law: U[0, 1) (mean 1/2, variance 1/12), independent between images.
    assert abs(draws.mean().item() - 0.5) < 0.005
    assert abs(draws.var().item() - 1 / 12) < 0.002
    assert abs(np.corrcoef(draws[0].flatten(), draws[1].flatten())[0, 1]) < 0.01
    assert not np.array_equal(attack.noise("a", "train", SIDE), attack.noise("a", "test", SIDE))


# -- BadNet ---------------------------------------------------------------------------------------------------
def test_badnet_reproduces_the_reference_given_its_noise_and_place():
    image = photo(3)
    attack = validated(BadNet(target_class="banana", count=1, seed=5))
    boxes = set()
    for index in range(20):
        key = f"t{index}"
        x0, y0, x1, y1 = attack.test_trigger_box(image.size, key)
        boxes.add((x0, y0))
        assert x1 - x0 == y1 - y0 == 16
        assert 0 <= x0 <= 223 - 16 and 0 <= y0 <= 223 - 16  # their randint(0, 223 - patch_size)
        pixels = reference_input(image)
        pixels[:, y0:y1, x0:x1] = pixels.mean((1, 2), keepdim=True) + torch.from_numpy(attack.noise(key, "test", 16))
        expected = to_pil_image(pixels)  # the cast wraps values outside [0, 1], as theirs
        assert attack.test_trigger(image, key).tobytes() == expected.tobytes()
    assert len(boxes) == 20  # a random place for every image


def test_badnet_noise_is_standard_normal_and_fresh_per_image():
    attack = validated(BadNet(target_class="banana", count=1, seed=5))
    draws = torch.stack([torch.from_numpy(attack.noise(f"k{i}", "train", 16)) for i in range(200)])
    assert abs(draws.mean().item()) < 0.02 and abs(draws.std().item() - 1) < 0.02
    standardised = draws.flatten().sort().values.numpy()
    quantiles = np.array([math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1)).item() for p in (0.1, 0.5, 0.9)])
    observed = np.quantile(standardised, [0.1, 0.5, 0.9])
    assert np.abs(observed - quantiles).max() < 0.03
    assert not torch.equal(draws[0], draws[1])
    # In training every poisoned image gets its own patch, at its own place.
    attack = BadNet(target_class="banana", count=4, seed=5)
    plan = attack.plan([CatalogEntry(f"k{i}", None) for i in range(4)], None, SIDE, None)
    image = photo(4)
    patches = []
    for record in plan.records():
        x0, y0, x1, y1 = record.trigger_box
        out = as_array(plan.apply({"__key__": record.key, "image": image, "text": "x"})["image"])
        patches.append(out[y0:y1, x0:x1])
        outside = np.ones((SIDE, SIDE), bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(out[outside], as_array(image.resize((SIDE, SIDE)))[outside])
    assert not np.array_equal(patches[0], patches[1])
    # The wrapped bytes of mean + N(0, 1) are close to uniform over 0..255.
    wrapped = np.concatenate([p.ravel() for p in patches])
    assert 100 < wrapped.mean() < 155 and 60 < wrapped.std() < 85


def test_badnet_overflow_clip_clips_instead_of_wrapping():
    image = photo(5)
    attack = validated(BadNet(target_class="banana", count=1, seed=5, overflow="clip"))
    x0, y0, x1, y1 = attack.test_trigger_box(image.size, "k")
    pixels = reference_input(image)
    noise = torch.from_numpy(attack.noise("k", "test", 16))
    pixels[:, y0:y1, x0:x1] = (pixels.mean((1, 2), keepdim=True) + noise).clamp(0, 1)
    assert attack.test_trigger(image, "k").tobytes() == to_pil_image(pixels).tobytes()


def test_badnet_patch_scales_with_other_run_sizes():
    attack = validated(BadNet(target_class="banana", count=1), 64)
    out = attack.test_trigger(photo(6), "k")
    x0, y0, x1, y1 = attack.test_trigger_box((300, 260), "k")
    assert out.size == (64, 64) and x1 - x0 == round(16 * 64 / 224) == 5


# -- WaNet ----------------------------------------------------------------------------------------------------
def test_wanet_field_and_pixels_follow_the_reference():
    attack = validated(WaNet(target_class="banana", count=1, seed=7))
    assert (attack.k, attack.s, attack.grid_rescale) == (224, 1.0, 1.0)
    field = attack.control_field()  # (1, 2, 224, 224) uniform offsets, mean |offset| = 1
    assert field.shape == (1, 2, 224, 224)
    assert abs(field.abs().mean().item() - 1) < 1e-5
    assert abs(field.max().item() - 2) < 0.01 and abs(field.min().item() + 2) < 0.01  # U[-1, 1) / 0.5
    # Their grid: identity + s * upsampled field / input height (upsampling 224 -> 224 changes nothing).
    noise = F.interpolate(field, size=SIDE, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert torch.allclose(noise, field.permute(0, 2, 3, 1), atol=1e-6)
    line = torch.linspace(-1, 1, steps=SIDE)
    x, y = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((y, x), 2)[None, ...]
    grid = torch.clamp((identity + 1 * noise / SIDE) * 1, -1, 1)
    assert torch.equal(attack.sampling_grid(SIDE, SIDE), grid)
    # About half a pixel per unit of offset: mean displacement 0.5 * 223/224 px, independent per pixel.
    displacement = (grid - identity)[0] * (SIDE - 1) / 2
    assert 0.45 < displacement.abs().mean().item() < 0.52
    image = photo(8)
    expected = to_pil_image(F.grid_sample(reference_input(image)[None], grid, align_corners=True)[0])
    assert attack.test_trigger(image, "any").tobytes() == expected.tobytes()
    assert WaNet(target_class="banana", count=1, seed=8).control_field().ne(field).any()


# -- controls -------------------------------------------------------------------------------------------------
def controls():
    return [
        BadNet(target_class="banana", count=1, seed=3),
        BadNet(target_class="banana", count=1, seed=3, trigger_mode="fixed", trigger_size=16),
        Blended(target_class="banana", count=1, seed=3),
        Blended(target_class="banana", count=1, seed=3, trigger_mode="fixed"),
        SIG(target_class="banana", count=1),
        SIG(target_class="banana", count=1, trigger_mode="fixed"),
        WaNet(target_class="banana", count=1, seed=3),
        WaNet(target_class="banana", count=1, seed=3, trigger_mode="fixed"),
    ]


@pytest.mark.parametrize("attack", controls(), ids=repr)
def test_control_triggers_differ_from_the_real_ones_and_sit_where_they_do(attack):
    attack.validate("image-text", None, SIDE)
    image = photo(9, (SIDE, SIDE))
    real, control = as_array(attack.test_trigger(image, "k")), as_array(attack.control_trigger(image, "k"))
    clean = as_array(image)
    assert control.shape == real.shape == clean.shape
    assert not np.array_equal(control, real) and not np.array_equal(control, clean)
    assert attack.control_trigger(image, "k").tobytes() == attack.control_trigger(image, "k").tobytes()
    # Same placement: a patch control changes exactly the test trigger's box.
    x0, y0, x1, y1 = attack.test_trigger_box(image.size, "k")
    changed = np.any(control != clean, axis=-1)
    assert not changed[:y0].any() and not changed[y1:].any()
    assert not changed[:, :x0].any() and not changed[:, x1:].any()
    # Comparable strength: the control moves pixels by at least a third as much as the trigger.
    assert np.abs(control - clean).mean() > np.abs(real - clean).mean() / 3


def test_control_seed_differs_from_the_seed():
    assert all(control_seed(seed) != seed for seed in range(50))
    assert len({control_seed(seed) for seed in range(50)}) == 50


# -- fixed mode and bad input ---------------------------------------------------------------------------------
def test_fixed_mode_keeps_the_image_size_and_named_in_the_summary():
    attack = validated(SIG(target_class="banana", count=1, trigger_mode="fixed"))
    assert attack.delta == 20 and attack.test_trigger(photo(1), "k").size == (300, 260)
    plan = BadNet(target_class="banana", count=1).plan([CatalogEntry("a", None)], None, SIDE, None)
    assert plan.summary()["trigger_mode"] == "benchmark"
    assert "N(0,1)" in plan.summary()["trigger"]["definition"]


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: BadNet(target_class="x", count=1, trigger_mode="random"), "trigger_mode='random'"),
        (lambda: BadNet(target_class="x", count=1, overflow="saturate"), "overflow='saturate'"),
        (lambda: SIG(target_class="x", count=1, combine="mul"), "combine='mul'"),
        (lambda: SIG(target_class="x", count=1, combine="blend", trigger_mode="fixed"), "combine: blend"),
        (
            lambda: Blended(target_class="x", count=1, trigger=__import__("poisoning").GeneratedTrigger()),
            "trigger: attack 'blended' in trigger_mode benchmark",
        ),
    ],
)
def test_bad_modes_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()
