"""SimCLR's views made on the training device, per sample, from parameters drawn on the CPU exactly as today.

The per-sample CPU path (``views.SimCLRViews``) runs torchvision's v2 pipeline on each decoded image, seeded from
(seed, epoch, key, view). Here the loader does only the cheap part: it decodes the image (poisoned canvases
included), hands it over as uint8 with its size, and draws each view's random parameters with the SAME seeded
generator, in the same order, through the same transforms' own ``make_params``, so the parameters are identical to
the ones the CPU path would use. ``DeviceViews`` then applies them to the whole batch at once on whatever device the
batch is on (``SimCLRDataModule.on_after_batch_transfer``): torchvision's v2 transforms on a batched tensor would
draw ONE parameter set for the whole batch (pytorch/vision#8484), so each step is written here per sample:

* resized crop: separable resampling matrices (rows, columns) with the antialiased bilinear weights torchvision uses
  (PIL's triangle filter, widened by the scale when shrinking), one pair per sample, zero outside its crop box;
* horizontal flip, colour jitter (brightness, contrast, saturation, hue, in each sample's random order), grayscale,
  Gaussian blur (per-sample sigma, reflect padding) and normalisation, with torchvision's float formulas.

Difference from the CPU path, by construction: the CPU path works on uint8 and rounds or truncates after the resize
and after every colour step; this path stays in float32. Measured on CIFAR-10 views (tests/test_device_views.py):
against torchvision's own functions applied in float with the same parameters the views agree to float rounding;
against the uint8 CPU path they differ by quantisation only (a few 1/255 steps at most, well under one on average).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from poisoning.keyhash import derive_seed

from .views import SimCLRAugmentation

# One row of floats per view. Crop box in pixels of the image; 0/1 flags; the colour-jitter order as four op indices
# (0 brightness, 1 contrast, 2 saturation, 3 hue: torchvision's numbering); factors (neutral when absent).
PARAM_NAMES = (
    "top",
    "left",
    "height",
    "width",
    "flip",
    "jitter",
    "order0",
    "order1",
    "order2",
    "order3",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur",
    "sigma",
)
P = {name: i for i, name in enumerate(PARAM_NAMES)}
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _make_params(transform: v2.Transform, flat_inputs: list[Any]) -> dict[str, Any]:
    # torchvision >= 0.21 names it make_params; older releases _get_params (same draws).
    method = getattr(transform, "make_params", None) or transform._get_params
    return method(flat_inputs)


def _draw(pipeline: v2.Compose, height: int, width: int) -> list[float]:
    """One view's parameters, drawing from torch's global CPU generator in the order v2's forward passes draw."""
    row = [0.0] * len(PARAM_NAMES)
    row[P["height"]], row[P["width"]] = float(height), float(width)
    row[P["brightness"]] = row[P["contrast"]] = row[P["saturation"]] = 1.0
    row[P["order0"] : P["order3"] + 1] = [0.0, 1.0, 2.0, 3.0]
    probe = [torch.empty((3, height, width), dtype=torch.uint8)]  # make_params reads only the size
    for transform in pipeline.transforms:
        if isinstance(transform, (v2.PILToTensor, v2.ToDtype, v2.Normalize, v2.ToImage)):
            continue
        if isinstance(transform, v2.RandomResizedCrop):
            box = _make_params(transform, probe)
            row[P["top"]], row[P["left"]] = float(box["top"]), float(box["left"])
            row[P["height"]], row[P["width"]] = float(box["height"]), float(box["width"])
        elif isinstance(transform, (v2.RandomHorizontalFlip, v2.RandomGrayscale)):
            # _RandomApplyTransform.forward: skipped when rand >= p; neither draws parameters
            applied = not bool(torch.rand(1) >= transform.p)
            row[P["flip" if isinstance(transform, v2.RandomHorizontalFlip) else "grayscale"]] = float(applied)
        elif isinstance(transform, v2.RandomApply):
            if torch.rand(1) >= transform.p:
                continue
            for inner in transform.transforms:
                params = _make_params(inner, probe)
                if isinstance(inner, v2.ColorJitter):
                    row[P["jitter"]] = 1.0
                    row[P["order0"] : P["order3"] + 1] = [float(i) for i in params["fn_idx"].tolist()]
                    for name in ("brightness", "contrast", "saturation", "hue"):
                        if params[f"{name}_factor"] is not None:
                            row[P[name]] = float(params[f"{name}_factor"])
                elif isinstance(inner, v2.GaussianBlur):
                    row[P["blur"]], row[P["sigma"]] = 1.0, float(params["sigma"][0])
                else:
                    raise ValueError(f"data.views_on_device: no device version of {type(inner).__name__}")
        else:
            raise ValueError(f"data.views_on_device: no device version of {type(transform).__name__}")
    return row


def draw_view_params(pipeline: v2.Compose, height: int, width: int, seed: int) -> list[float]:
    """``_draw`` with torch's CPU generator seeded, restoring the caller's state after (as ``views.seeded``)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return _draw(pipeline, height, width)
    finally:
        generator.set_state(state)


class ViewParams:
    """Worker side: image -> (uint8 CHW tensor, its (height, width), the two views' parameters [2, len(PARAM_NAMES)])."""

    def __init__(self, augmentation: SimCLRAugmentation, seed: int = 0):
        self.augmentation = augmentation
        self.pipeline = augmentation.build()
        self.seed = seed

    def __call__(self, image: Image.Image, key: str, epoch: int) -> dict[str, torch.Tensor]:
        pixels = TF.pil_to_tensor(image)
        height, width = pixels.shape[-2:]
        rows = [draw_view_params(self.pipeline, height, width, derive_seed(self.seed, epoch, key, v)) for v in (0, 1)]
        return {
            "image_u8": pixels,
            "image_hw": torch.tensor([height, width], dtype=torch.long),
            "view_params": torch.tensor(rows, dtype=torch.float64),
        }


def pad_collate(collate):
    """Wraps a collate function: pads ``image_u8`` to the batch's largest height and width (bottom / right) first,
    so CIFAR images and NA's r x 2r canvases share one tensor; each keeps its size in ``image_hw``."""

    def padded(items: list[dict[str, Any]]) -> dict[str, Any]:
        if items and "image_u8" in items[0]:
            height = max(item["image_u8"].shape[-2] for item in items)
            width = max(item["image_u8"].shape[-1] for item in items)
            for item in items:
                image = item["image_u8"]
                if image.shape[-2:] != (height, width):
                    item["image_u8"] = F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
        return collate(items)

    return padded


# ---- the device side ---------------------------------------------------------------------------------------------
def triangle_filter(x: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear filter (support 1), which torchvision's antialiased tensor resize uses too."""
    return (1.0 - x.abs()).clamp(min=0.0)


def bicubic_filter(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter: Keys' cubic convolution with a = -0.5, support 2 (zero from |x| = 2 on)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


RESAMPLING_FILTERS = {"bilinear": triangle_filter, "bicubic": bicubic_filter}


def resample_matrix(
    start: torch.Tensor,
    length: torch.Tensor,
    size_in: int,
    size_out: int,
    interpolation: str = "bilinear",
    window_start: torch.Tensor | None = None,
    window_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, size_out, size_in]: row i holds the weights of output pixel i over input pixels, for the input span of
    ``length`` pixels from ``start`` (floats allowed) resized to ``size_out`` pixels, as PIL resamples (and
    torchvision's resize with ``antialias=True``): output pixel i is centred at ``start + (i + 0.5) * scale`` with
    scale = length / size_out, the filter is widened by the scale when shrinking, the weights are limited to the
    valid input pixels [window_start, window_start + window_length) and normalised per output pixel.

    The window defaults to the span itself: a crop made first, then resized (a resized crop). A resize of the whole
    image followed by a centre crop gives the whole image as the window instead: there the filter also reads pixels
    just outside the part that ends up in the crop."""
    kernel = RESAMPLING_FILTERS[interpolation]
    if window_start is None or window_length is None:
        window_start, window_length = start, length
    start, length = (v.to(torch.float32)[:, None, None] for v in (start, length))
    low = window_start.to(torch.float32)[:, None, None]
    high = low + window_length.to(torch.float32)[:, None, None]
    scale = length / size_out
    filter_scale = scale.clamp(min=1.0)
    out = torch.arange(size_out, device=start.device, dtype=torch.float32)[None, :, None]
    pixel = torch.arange(size_in, device=start.device, dtype=torch.float32)[None, None, :]
    centre = start + scale * (out + 0.5)
    weights = kernel((pixel + 0.5 - centre) / filter_scale) * ((pixel >= low) & (pixel < high))
    return weights / weights.sum(dim=-1, keepdim=True)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (images * factor + other * (1.0 - factor)).clamp(0.0, 1.0)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    equal = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    s = spread / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    max_is_b = ~max_is_r & ~max_is_g
    h = (bc - gc) * max_is_r + (2.0 + rc - bc) * max_is_g + (4.0 + gc - rc) * max_is_b
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i.to(torch.int64), 6)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * f) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * f) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hsv.device)
    index = select[:, i].moveaxis(0, 1)  # [B, 3, H, W]
    return vpqt.gather(1, index)


def _adjust(images: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness
        return (images * factor.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if op == 1:  # contrast: blend with the mean grey level of the whole image
        return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == 2:  # saturation
        return _blend(images, _grayscale(images), factor)
    hsv = _rgb_to_hsv(images)  # hue
    h = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def _color_jitter(images: torch.Tensor, params: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """Each jittered sample gets its four adjustments in its own order: for each of the 4 positions and 4 ops, the
    samples concerned (a factor torchvision would skip, None, is the neutral one and is skipped too).
    ``sync_free`` (on a GPU): every op on the whole batch, kept where chosen (torch.where): no host synchronisation,
    so the loop never waits for the GPU; else only the chosen samples are computed (less work, for the CPU)."""
    jittered = params[:, P["jitter"]] > 0.5
    if not sync_free and not bool(jittered.any()):
        return images
    factors = params[:, [P["brightness"], P["contrast"], P["saturation"], P["hue"]]].to(images.dtype)
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], device=images.device, dtype=images.dtype)
    orders = params[:, P["order0"] : P["order3"] + 1].round().long()
    if not sync_free:
        images = images.clone()
    for position in range(4):
        for op in range(4):
            chosen = jittered & (orders[:, position] == op) & (factors[:, op] != neutral[op])
            if sync_free:
                images = torch.where(chosen.view(-1, 1, 1, 1), _adjust(images, op, factors[:, op]), images)
                continue
            index = chosen.nonzero().squeeze(1)
            if index.numel():
                images[index] = _adjust(images[index], op, factors[index, op])
    return images


def _gaussian_blur(images: torch.Tensor, params: torch.Tensor, kernel_size: int, sync_free: bool) -> torch.Tensor:
    """torchvision's gaussian_blur (separable kernel, reflect padding) with each blurred sample's own sigma."""
    blurred = params[:, P["blur"]] > 0.5
    index = torch.arange(len(images), device=images.device) if sync_free else blurred.nonzero().squeeze(1)
    if not index.numel():
        return images
    sigma = params[index, P["sigma"]].to(images.dtype)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # unblurred samples (sync_free): any valid sigma
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [n, k]
    selected = images[index]
    n, c, h, w = selected.shape
    pad = kernel_size // 2
    flat = F.pad(selected.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    weight = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    flat = F.conv2d(flat, weight[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, weight[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    if sync_free:
        return torch.where(blurred.view(-1, 1, 1, 1), flat, images)
    images = images.clone()
    images[index] = flat
    return images


class DeviceViews:
    """Applies one view's parameters to a batch of uint8 images on the batch's device: [B, 3, S, S] float32."""

    def __init__(self, augmentation: SimCLRAugmentation):
        self.augmentation = augmentation
        self.size = augmentation.image_size
        self.kernel_size = 2 * (self.size // 20) + 1  # as SimCLRAugmentation.build

    def __call__(
        self, images_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True, sync_free: bool | None = None
    ) -> torch.Tensor:
        """``sync_free`` (default: on anything but the CPU) avoids every host synchronisation (see _color_jitter)."""
        sync_free = images_u8.device.type != "cpu" if sync_free is None else sync_free
        # float32 throughout, also when called inside a bf16 autocast region (bf16 would round the resampling
        # products to ~1/256: the uint8 CPU path's error again).
        with torch.autocast(images_u8.device.type, enabled=False):
            return self._views(images_u8, params.to(images_u8.device), normalize, sync_free)

    def _views(self, images_u8: torch.Tensor, params: torch.Tensor, normalize: bool, sync_free: bool) -> torch.Tensor:
        images = images_u8.to(torch.float32) / 255.0
        _, _, height, width = images.shape
        rows = resample_matrix(params[:, P["top"]], params[:, P["height"]], height, self.size)
        cols = resample_matrix(params[:, P["left"]], params[:, P["width"]], width, self.size)
        views = rows[:, None] @ images @ cols.transpose(1, 2)[:, None]  # [B, 3, S, S]
        flip = params[:, P["flip"]] > 0.5
        views = torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views).clamp(0.0, 1.0)
        views = _color_jitter(views, params, sync_free)
        gray = params[:, P["grayscale"]] > 0.5
        views = torch.where(gray.view(-1, 1, 1, 1), _grayscale(views).expand_as(views), views)
        if self.augmentation.blur_p > 0:
            views = _gaussian_blur(views, params, self.kernel_size, sync_free)
        if not normalize:
            return views
        mean = torch.tensor(self.augmentation.mean, device=views.device).view(1, 3, 1, 1)
        std = torch.tensor(self.augmentation.std, device=views.device).view(1, 3, 1, 1)
        return (views - mean) / std

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch from ``ViewParams`` items -> the same batch with ``views`` (the raw fields removed)."""
        images = batch.pop("image_u8")
        params = batch.pop("view_params")
        batch.pop("image_hw", None)
        batch["views"] = [self(images, params[:, view]) for view in range(params.shape[1])]
        return batch


class DeviceHook:
    """What a data module needs to make training images on the device: ``item`` (in the loaders: decoded uint8
    pixels and the random parameters), ``collate`` (padding to the batch's largest image), ``finish`` (after the
    transfer: ``transform.batch``). Built once; the transform holds no state, so loaders and the training process
    share it. ``raw_key``: the field of a batch whose images are still to be made."""

    raw_key: str = ""
    transform: Any

    @staticmethod
    def collate(collate):
        return pad_collate(collate)

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.transform.batch(batch)


class DeviceViewsHook(DeviceHook):
    """SimCLR's (``views_on_device``): two views' parameters per image; ``finish`` makes ``views``."""

    raw_key = "view_params"

    def __init__(self, augmentation: SimCLRAugmentation, seed: int = 0):
        self.params = ViewParams(augmentation, seed=seed)
        self.transform = DeviceViews(augmentation)

    def item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        item = self.params(sample["image"], sample["__key__"], epoch)
        item.update(label=sample["label"], poisoned=bool(sample.get("poisoned", False)), key=sample["__key__"])
        return item
