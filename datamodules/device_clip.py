"""CLIP's training image made on the training device, from the crop the CPU path would draw (``data.images_on_device``).

The per-sample CPU path (``views.CLIPPreprocess``) runs open_clip's own transform on each decoded PIL image:

* train: ``RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)`` (open_clip's ``AugmentationCfg``
  default), seeded from (seed, epoch, key, "clip"), then RGB, ``ToTensor`` and ``Normalize``;
* eval (also the training image with ``train_augment: false``, CleanCLIP's default): ``Resize(size, BICUBIC)`` of the
  shortest side, ``CenterCrop(size)``, RGB, ``ToTensor``, ``Normalize``.

Here the loader does the cheap part: it decodes the image (poisoned ones included), hands it over as uint8 with its
size, and gives the resampling each axis needs: the span of input pixels that maps onto the output and the window
of input pixels the filter may read. For the train transform the crop is drawn by the transform's own ``get_params``
from the same seeded generator, so it is the CPU path's crop; span and window are that crop (the crop is cut out
first, then resized). For the eval transform span and window follow torchvision's arithmetic (the long side resized
to ``int(size * long / short)``, the crop offset ``int(round((resized - size) / 2))``), and the window is the whole
image: there the whole image is resized before the crop, so the filter also reads pixels beside the crop.

``DeviceCLIPImages`` then resamples the batch on whatever device it is on, as PIL does: per sample, a separable
pair of bicubic resampling matrices (``device_views.resample_matrix``: PIL's bicubic with a = -0.5, support 2,
widened by the scale when shrinking, restricted to the window, normalised), the horizontal pass first and values
clipped to [0, 1] after each pass, in float32 (also inside a bf16 autocast region), then normalisation.

Difference from the CPU path, by construction: PIL resamples uint8 images with fixed-point weights and rounds and
clips to uint8 after each pass; this path stays in float32. Measured (tests/test_device_clip.py) in grey levels of
the image before normalisation: max 1.08 and mean 0.25-0.31, the rounding of PIL's two uint8 passes (against PIL's
own resampling run in float the difference is float rounding, at most 0.004).

Cost: one [size, H] and one [size, W] matrix per sample and two batched matmuls over the batch padded to its
largest image, 3 x size x (H x W + H x size) multiply-adds per image (~0.25 G for a 500 px photo at 224 px) where PIL
reads only the filter's taps: cheap on a GPU, ~0.15x PIL's images/s on a CPU (``benchmarks/device_views.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from poisoning.keyhash import derive_seed

from .device_views import DeviceHook, resample_matrix
from .views import CLIPPreprocess, seeded

# One row of floats per image: the span of input pixels resampled onto the output, then the window the filter may
# read (both in input pixels; spans may start between pixels).
PARAM_NAMES = ("top", "left", "height", "width", "window_top", "window_left", "window_height", "window_width")
P = {name: i for i, name in enumerate(PARAM_NAMES)}


def _step_names(preprocess: CLIPPreprocess) -> list[str]:
    return [type(step).__name__ for step in preprocess.transform.transforms]


def check_reproducible(preprocess: CLIPPreprocess) -> None:
    """Refuse, before any compute, a transform this module would not reproduce (ValueError naming the option)."""
    steps = preprocess.transform.transforms
    size, bicubic = preprocess.image_size, T.InterpolationMode.BICUBIC
    tail = ["MaybeConvertMode", "MaybeToTensor", "Normalize"]
    if preprocess.train:
        expected = ["RandomResizedCrop", *tail]
        geometry_ok = _step_names(preprocess) == expected and steps[0].interpolation == bicubic
        geometry_ok = geometry_ok and list(steps[0].size) == [size, size]
    else:
        expected = ["Resize", "CenterCrop", *tail]
        geometry_ok = _step_names(preprocess) == expected and steps[0].interpolation == bicubic
        geometry_ok = geometry_ok and steps[0].size in (size, [size]) and steps[0].max_size is None
        geometry_ok = geometry_ok and list(steps[1].size) == [size, size]
    if not geometry_ok:
        raise ValueError(
            f"data.images_on_device: no device version of this open_clip transform ({', '.join(_step_names(preprocess))}"
            f"; reproduced: {', '.join(expected)} with bicubic resampling to {size} px); set it false"
        )
    normalize = steps[-1]
    if tuple(normalize.mean) != tuple(preprocess.mean) or tuple(normalize.std) != tuple(preprocess.std):
        raise ValueError("data.images_on_device: the transform's normalisation differs from the model's; set it false")


def eval_spans(height: int, width: int, size: int) -> list[float]:
    """Resize of the shortest side to ``size`` + centre crop, as spans over the whole image (torchvision's rounding)."""
    short, long = min(height, width), max(height, width)
    resized_long = int(size * long / short)
    resized_h, resized_w = (resized_long, size) if width <= height else (size, resized_long)
    top, left = int(round((resized_h - size) / 2.0)), int(round((resized_w - size) / 2.0))
    scale_h, scale_w = height / resized_h, width / resized_w
    return [top * scale_h, left * scale_w, size * scale_h, size * scale_w, 0.0, 0.0, float(height), float(width)]


class CLIPImageParams:
    """Worker side: image -> (uint8 CHW tensor, its (height, width), the resampling spans [len(PARAM_NAMES)])."""

    def __init__(self, preprocess: CLIPPreprocess):
        check_reproducible(preprocess)
        self.preprocess = preprocess
        self.crop = preprocess.transform.transforms[0] if preprocess.train else None

    def spans(self, pixels: torch.Tensor, key: str, epoch: int) -> list[float]:
        height, width = pixels.shape[-2:]
        if self.crop is None:
            return eval_spans(height, width, self.preprocess.image_size)
        crop = self.crop
        seed = derive_seed(self.preprocess.seed, epoch, key, "clip")  # CLIPPreprocess.image's seed
        top, left, crop_h, crop_w = seeded(lambda image: crop.get_params(image, crop.scale, crop.ratio), pixels, seed)
        return [float(v) for v in (top, left, crop_h, crop_w)] * 2

    def __call__(self, image: Image.Image, key: str, epoch: int) -> dict[str, torch.Tensor]:
        pixels = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        return {
            "image_u8": pixels,
            "image_hw": torch.tensor(pixels.shape[-2:], dtype=torch.long),
            "image_params": torch.tensor(self.spans(pixels, key, epoch), dtype=torch.float64),
        }


class DeviceCLIPImages:
    """Applies the spans to a batch of uint8 images on the batch's device: [B, 3, size, size] float32, normalised."""

    def __init__(self, preprocess: CLIPPreprocess):
        self.size = preprocess.image_size
        self.mean = preprocess.mean
        self.std = preprocess.std

    def __call__(self, images_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # float32 also inside a bf16 autocast region: bf16 would round the weights and products to ~1/256.
        with torch.autocast(images_u8.device.type, enabled=False):
            return self._images(images_u8, params.to(images_u8.device), normalize)

    def _matrix(self, params: torch.Tensor, axis: str, size_in: int) -> torch.Tensor:
        start, length = ("top", "height") if axis == "rows" else ("left", "width")
        return resample_matrix(
            params[:, P[start]],
            params[:, P[length]],
            size_in,
            self.size,
            interpolation="bicubic",
            window_start=params[:, P[f"window_{start}"]],
            window_length=params[:, P[f"window_{length}"]],
        )

    def _images(self, images_u8: torch.Tensor, params: torch.Tensor, normalize: bool) -> torch.Tensor:
        images = images_u8.to(torch.float32) / 255.0
        _, _, height, width = images.shape
        cols = self._matrix(params, "cols", width)
        rows = self._matrix(params, "rows", height)
        # PIL's order: horizontal pass, clip, vertical pass, clip (bicubic overshoots at edges).
        images = (images @ cols.transpose(1, 2)[:, None]).clamp(0.0, 1.0)  # [B, 3, H, size]
        images = (rows[:, None] @ images).clamp(0.0, 1.0)  # [B, 3, size, size]
        if not normalize:
            return images
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch from ``CLIPImageParams`` items -> the same batch with ``image`` (raw fields removed)."""
        images = batch.pop("image_u8")
        params = batch.pop("image_params")
        batch.pop("image_hw", None)
        batch["image"] = self(images, params)
        return batch


class DeviceCLIPImagesHook(DeviceHook):
    """CLIP's (``images_on_device``): the image fields of an item; ``finish`` makes ``image``."""

    raw_key = "image_params"

    def __init__(self, preprocess: CLIPPreprocess):
        self.params = CLIPImageParams(preprocess)
        self.transform = DeviceCLIPImages(preprocess)

    def item(self, sample: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        return self.params(sample["image"], sample["__key__"], epoch)
