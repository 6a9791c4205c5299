"""Views on the device (datamodules.device_views) against the per-sample CPU path (datamodules.views).

Same (seed, epoch, key, view) -> the same parameters, drawn by the transforms' own make_params; then two
comparisons of the views themselves:
* against torchvision's functions applied in float32 to each sample with those parameters: equal to float rounding
  (the device transform computes the same function, per sample);
* against today's CPU path, which works in uint8 (rounding after the resize, truncating after each colour step):
  equal up to that quantisation, stated and measured here in 1/255 steps of the unnormalised image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from datamodules.device_views import DeviceViews, DeviceViewsHook, P, ViewParams, pad_collate, resample_matrix
from datamodules.modalities import SimCLRDataModule
from datamodules.stream import default_collate
from datamodules.views import SimCLRAugmentation, SimCLRViews

OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour gradients plus noise (random noise alone would make every view's colour statistics alike)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(1, 6) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    pixels = 127.5 + 110 * np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def images_and_keys(n: int = 40) -> list[tuple[Image.Image, str]]:
    """CIFAR-sized images and NA-style r x 2r canvases, both orientations."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32)] * (n - 6) + [(32, 64)] * 3 + [(64, 32)] * 3
    return [(photo_like(rng, h, w), f"key_{i}") for i, (h, w) in enumerate(sizes)]


def float_reference(image: Image.Image, row: torch.Tensor, augmentation: SimCLRAugmentation) -> torch.Tensor:
    """torchvision's own functions in float32, one sample, with the parameters the device path was given."""
    out = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
    size = augmentation.image_size
    top, left, height, width = (int(row[P[k]]) for k in ("top", "left", "height", "width"))
    out = TF.resized_crop(out, top, left, height, width, [size, size], antialias=True)
    if row[P["flip"]] > 0.5:
        out = TF.horizontal_flip(out)
    if row[P["jitter"]] > 0.5:
        factors = [row[P[k]].item() for k in ("brightness", "contrast", "saturation", "hue")]
        for op in row[P["order0"] : P["order3"] + 1].long().tolist():
            out = OPS[op](out, factors[op])
    if row[P["grayscale"]] > 0.5:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if row[P["blur"]] > 0.5:
        kernel = 2 * (size // 20) + 1
        out = TF.gaussian_blur(out, [kernel, kernel], [row[P["sigma"]].item()] * 2)
    return TF.normalize(out, list(augmentation.mean), list(augmentation.std))


def device_views(augmentation: SimCLRAugmentation, pairs, epoch: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    params = ViewParams(augmentation, seed=7)
    items = [params(image, key, epoch) for image, key in pairs]
    batch = pad_collate(default_collate)(items)
    rows = batch["view_params"].clone()
    return DeviceViews(augmentation).batch(batch)["views"], rows


def to_255(views: torch.Tensor, augmentation: SimCLRAugmentation) -> torch.Tensor:
    """Normalised views back to the 0..255 scale of the image."""
    std = torch.tensor(augmentation.std).view(1, 3, 1, 1)
    mean = torch.tensor(augmentation.mean).view(1, 3, 1, 1)
    return (views * std + mean) * 255


@pytest.mark.parametrize("blur_p", [0.0, 0.5], ids=["cifar", "with_blur"])
def test_device_views_equal_torchvision_in_float_with_the_same_parameters(blur_p):
    augmentation = SimCLRAugmentation(image_size=32, blur_p=blur_p)
    pairs = images_and_keys()
    views, rows = device_views(augmentation, pairs)
    assert (
        rows[:, :, P["jitter"]].mean() > 0.5 and rows[:, :, P["flip"]].min() == 0 and rows[:, :, P["flip"]].max() == 1
    )
    for v in (0, 1):
        reference = torch.stack(
            [float_reference(image, rows[i, v], augmentation) for i, (image, _) in enumerate(pairs)]
        )
        difference = (to_255(views[v], augmentation) - to_255(reference, augmentation)).abs()
        assert difference.max() < 0.02, difference.max()  # float32 rounding only (measured: 4.3e-4)


def test_device_views_match_the_uint8_cpu_path_up_to_quantisation():
    augmentation = SimCLRAugmentation(image_size=32)
    pairs = images_and_keys()
    views, _ = device_views(augmentation, pairs)
    cpu = SimCLRViews(augmentation, seed=7)
    for v in (0, 1):
        reference = torch.stack([cpu(image, key, 3)[v] for image, key in pairs])
        difference = (to_255(views[v], augmentation) - to_255(reference, augmentation)).abs()
        # Measured: max 6.6, mean 1.2-1.3 (the uint8 path truncates after each colour step: biased ~0.5 low each).
        assert difference.mean() < 2.0, difference.mean()
        assert difference.max() <= 9.0, difference.max()
        assert (difference.amax(dim=(1, 2, 3)) <= 9.0).all()


@pytest.mark.parametrize("blur_p", [0.0, 0.5], ids=["cifar", "with_blur"])
def test_the_gpu_variant_without_host_syncs_computes_the_same_views(blur_p):
    """On a GPU every op runs on the whole batch and is kept by torch.where (no .nonzero() sync); same result."""
    augmentation = SimCLRAugmentation(image_size=32, blur_p=blur_p)
    params = ViewParams(augmentation, seed=7)
    batch = pad_collate(default_collate)([params(image, key, 3) for image, key in images_and_keys()])
    transform = DeviceViews(augmentation)
    for v in (0, 1):
        subsets = transform(batch["image_u8"], batch["view_params"][:, v], sync_free=False)
        masked = transform(batch["image_u8"], batch["view_params"][:, v], sync_free=True)
        assert torch.allclose(subsets, masked, atol=1e-5)


def test_views_stay_float32_inside_a_bf16_autocast_region():
    """Lightning may call the batch hooks under bf16-mixed autocast; the views must not be made in bf16."""
    augmentation = SimCLRAugmentation(image_size=32)
    params = ViewParams(augmentation, seed=7)
    batch = pad_collate(default_collate)([params(image, key, 3) for image, key in images_and_keys(12)])
    transform = DeviceViews(augmentation)
    plain = transform(batch["image_u8"], batch["view_params"][:, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = transform(batch["image_u8"], batch["view_params"][:, 0])
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_parameters_are_the_cpu_paths_own_draws():
    """Another epoch or key gives other parameters; the same ones give the same, whatever the batch around them."""
    augmentation = SimCLRAugmentation(image_size=32)
    pairs = images_and_keys(10)
    params = ViewParams(augmentation, seed=7)
    first = params(pairs[0][0], "a", 0)["view_params"]
    assert torch.equal(first, params(pairs[0][0], "a", 0)["view_params"])
    assert not torch.equal(first, params(pairs[0][0], "a", 1)["view_params"])
    assert not torch.equal(first, params(pairs[0][0], "b", 0)["view_params"])
    assert not torch.equal(first[0], first[1])  # the two views differ
    state = torch.get_rng_state()
    params(pairs[0][0], "a", 0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is left as it was


def test_resample_matrix_is_torchvisions_antialiased_resize():
    """Shrinking (a 64 px crop to 32 px), enlarging and a shifted crop, against F.resized_crop in float."""
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 48, 64, generator=rng)
    for top, left, height, width in ((0, 0, 48, 64), (5, 9, 20, 13), (10, 3, 37, 61)):
        rows = resample_matrix(torch.tensor([top]), torch.tensor([height]), 48, 32)
        cols = resample_matrix(torch.tensor([left]), torch.tensor([width]), 64, 32)
        ours = rows[:, None] @ image @ cols.transpose(1, 2)[:, None]
        reference = TF.resized_crop(image, top, left, height, width, [32, 32], antialias=True)
        assert torch.allclose(ours, reference, atol=1e-5), (top, left, height, width)


def test_datamodule_hands_over_uint8_and_makes_views_after_the_transfer(make_shards):
    shards = make_shards(n=64, per_shard=32)
    common = dict(train_shards=str(shards / "train.index.json"), val_shards=None, batch_size=16, num_workers=0)
    on_cpu = SimCLRDataModule(**common)
    on_device = SimCLRDataModule(**common, views_on_device=True)
    cpu_batch = next(iter(on_cpu.train_dataloader()))
    raw = next(iter(on_device.train_dataloader()))
    assert raw["image_u8"].dtype == torch.uint8 and raw["view_params"].shape == (16, 2, len(P))
    assert "views" not in raw and raw["key"] == cpu_batch["key"]
    made = on_device.on_after_batch_transfer(raw, 0)
    for ours, theirs in zip(made["views"], cpu_batch["views"]):
        assert ours.shape == theirs.shape == (16, 3, 32, 32)
        assert (to_255(ours, on_device.augmentation) - to_255(theirs, on_device.augmentation)).abs().mean() < 2.0
    assert torch.equal(made["label"], cpu_batch["label"])


def test_hook_rejects_a_pipeline_step_it_cannot_make():
    class Solarizing(SimCLRAugmentation):
        def build(self):
            from torchvision.transforms import v2

            return v2.Compose([v2.PILToTensor(), v2.RandomSolarize(128)])

    hook = DeviceViewsHook(Solarizing(image_size=32))
    with pytest.raises(ValueError, match="views_on_device.*RandomSolarize"):
        hook.item({"image": images_and_keys(7)[0][0], "__key__": "k", "label": 0}, 0)
