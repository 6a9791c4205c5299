"""Per-sample image pipelines: SimCLR's two random views, CLIP's preprocess + tokens, and deterministic eval.

Random augmentations are seeded per sample from (seed, epoch, key, view), so a sample is augmented the same way
whatever the number of workers or ranks, and a resumed run repeats the augmentations of an uninterrupted one.
torchvision's transforms draw from torch's global CPU generator: each call seeds it and restores its state after, so
the caller's generator (the training process's, when ``num_workers=0``) is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from poisoning.keyhash import derive_seed

from .openclip_configs import open_clip_config

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded(transform: Callable, image: Image.Image, seed: int):
    """Run a torchvision transform with torch's CPU generator seeded, restoring the caller's state after.

    Only ``torch.default_generator`` is seeded (the one CPU transforms draw from): ``torch.manual_seed`` also seeds
    CUDA, XPU and MTIA, and while those are not initialised (a loader process) each of them queues the seed with a
    ``traceback.format_stack()``, about 0.3 ms per call: more than the SimCLR transform itself on a 32 px image.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


@dataclass
class SimCLRAugmentation:
    """SimCLR's augmentation for small images (the CIFAR-10 settings of the NA authors and solo-learn)."""

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    flip_p: float = 0.5
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def build(self) -> v2.Compose:
        steps: list = [
            v2.PILToTensor(),
            v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(self.flip_p),
            v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_p),
            v2.RandomGrayscale(self.grayscale_p),
        ]
        if self.blur_p > 0:
            kernel = 2 * (self.image_size // 20) + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=self.blur_p))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)


class SimCLRViews:
    """image -> two independently augmented views, each seeded from (seed, epoch, key, view index)."""

    def __init__(self, augmentation: SimCLRAugmentation, seed: int = 0):
        self.augmentation = augmentation
        self.transform = augmentation.build()
        self.seed = seed

    def __call__(self, image: Image.Image, key: str, epoch: int) -> list[torch.Tensor]:
        return [seeded(self.transform, image, derive_seed(self.seed, epoch, key, view)) for view in (0, 1)]


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """Deterministic: resize the short side (to ``resize``, default ``image_size``), centre crop, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize or image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class CLIPPreprocess:
    """open_clip's own image transform (train or eval) and tokenizer for a model name, seeded per key."""

    def __init__(self, model_name: str, *, train: bool, seed: int = 0):
        import open_clip

        config = open_clip_config(model_name)
        size = config["vision_cfg"].get("image_size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        preprocess = config.get("preprocess_cfg", {})
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.transform = open_clip.image_transform(self.image_size, is_train=train, mean=self.mean, std=self.std)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.train = train
        self.seed = seed

    def image(self, image: Image.Image, key: str, epoch: int) -> torch.Tensor:
        if self.train:
            return seeded(self.transform, image, derive_seed(self.seed, epoch, key, "clip"))
        return self.transform(image)

    def tokens(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]
