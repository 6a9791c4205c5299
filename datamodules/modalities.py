"""The data module of each modality: image methods (SimCLR's two views + label) and CLIP (image + tokens + label),
each a ``ShardDataModule`` (shards, ranks, the poisoner, eval triggers) that adds its views and monitors."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .builtin import resolve_builtin
from .datamodule import ShardDataModule
from .shards import resolve_shards
from .stream import ShardStream, default_collate
from .views import CIFAR10_MEAN, CIFAR10_STD, CLIPPreprocess, SimCLRAugmentation, SimCLRViews, eval_transform


class SimCLRDataModule(ShardDataModule):
    """Two augmented views per sample (SimCLR), plus clean kNN-bank and eval streams for the monitors.

    Args:
        image_size: side of the views (32 for CIFAR-10).
        augmentation: SimCLR augmentation parameters (crop scale/ratio, colour jitter, grayscale, blur, norm).
        knn_bank_shards: labelled clean shards for the kNN monitor's memory bank; default: the training shards
            read with the eval transform and no poisoning.
        knn_bank_size: use at most this many bank samples.
        views_on_device: the loader decodes and draws each view's random parameters (the same as the CPU path's)
            but makes no view; the views are made for the whole batch on the training device after the transfer
            (``device_views``). Same views up to uint8 rounding; the loaders' work per image drops to the decode.
        channels_last: training views in channels-last memory order (NHWC), which convolutions in bf16 on a GPU
            run faster in; on a CPU it mostly adds a copy.
    """

    modality: ClassVar[str] = "image"

    def __init__(
        self,
        *args: Any,
        image_size: int = 32,
        augmentation: SimCLRAugmentation | None = None,
        knn_bank_shards: str | None = None,
        knn_bank_size: int | None = 10000,
        views_on_device: bool = False,
        channels_last: bool = False,
        **kwargs: Any,
    ):
        self._image_size = image_size
        self.views_on_device = views_on_device
        self.channels_last = channels_last
        super().__init__(*args, **kwargs)
        self.augmentation = augmentation or SimCLRAugmentation(image_size=image_size)
        if self.augmentation.image_size != image_size:
            raise ValueError(
                f"data.augmentation.image_size={self.augmentation.image_size} differs from data.image_size={image_size}"
            )
        self.knn_bank_shards = knn_bank_shards
        self.knn_bank_size = knn_bank_size
        self._views: SimCLRViews | None = None
        self._device: Any = None
        self._eval: Any = None

    @property
    def image_size(self) -> int:
        return self._image_size

    def train_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        if self.views_on_device:
            return self.device_hook().item(sample, epoch)
        if self._views is None:
            self._views = SimCLRViews(self.augmentation, seed=self.seed)
        return {
            "views": self._views(sample["image"], sample["__key__"], epoch),
            "label": sample["label"],
            "poisoned": bool(sample.get("poisoned", False)),
            "key": sample["__key__"],
        }

    def device_hook(self):
        if not self.views_on_device:
            return None
        if self._device is None:
            from .device_views import DeviceViewsHook

            self._device = DeviceViewsHook(self.augmentation, seed=self.seed)
        return self._device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Views on the device made (the base class), then laid out channels-last when asked."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.channels_last and isinstance(batch, dict) and "views" in batch:
            batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
        return batch

    def _eval_transform(self):
        if self._eval is None:
            self._eval = eval_transform(self.image_size, self.augmentation.mean, self.augmentation.std)
        return self._eval

    def bank_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        return {"image": self._eval_transform()(sample["image"]), "label": sample["label"]}

    def bank_stream(self, build_resident: bool = True) -> ShardStream:
        index = (
            resolve_shards(resolve_builtin(self.knn_bank_shards), name="data.knn_bank_shards")
            if self.knn_bank_shards
            else self.index("train")
        )
        return ShardStream(
            index,
            resident=self.resident_shards(index, "knn_bank", build=build_resident),
            batch_size=self.eval_batch_size,
            to_item=self.bank_item,
            collate=default_collate,
            train=False,
            seed=self.seed,
            need_label=True,
            max_samples=self.knn_bank_size,
            min_image_size=self.min_image_size,
            name="knn_bank",
        )

    def val_dataloader(self):
        """[kNN bank (clean train images), val images (+ triggered)]: the kNN monitor needs both."""
        if not self.val_shards:
            return []
        return [self._eval_loader(self.bank_stream()), super().val_dataloader()]

    def test_dataloader(self):
        """[probe training images (clean train), test images (+ triggered)]: for kNN and the linear probe."""
        return [self._loader(self.bank_stream(build_resident=False)), super().test_dataloader()]


class CLIPDataModule(ShardDataModule):
    """Image-text pairs for CLIP: open_clip's preprocess and tokenizer for ``model_name``.

    Args:
        model_name: the open_clip model this data feeds (image size, normalisation, tokenizer); must match
            ``model.model_name``.
        train_augment: True: open_clip's train transform for the training images (random resized crop); False: its
            eval transform (resize + centre crop), as the CleanCLIP and MCLDef authors fine-tune.
        images_on_device: the loader decodes and draws the crop (the same as the CPU path's) but makes no training
            image; the batch's images are resampled (bicubic, as PIL) and normalised on the training device after
            the transfer (``device_clip``). Same images up to PIL's uint8 rounding (at most ~1 grey level); the
            loaders' work per image drops to the decode. On a CPU the batched resampling (dense matrices over the
            batch padded to its largest image) runs in the training process at ~0.15x the images/s of open_clip's
            per-sample preprocess (224 px photos, ``benchmarks/device_views.py``): for GPUs. Evaluation images and
            CleanCLIP's ``image_aug`` stay made by the loaders.
    """

    modality: ClassVar[str] = "image-text"

    def __init__(
        self,
        *args: Any,
        model_name: str = "clip-tiny-vit",
        train_augment: bool = True,
        images_on_device: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.model_name = model_name
        self.train_augment = train_augment
        self.images_on_device = images_on_device
        self._train_pre: CLIPPreprocess | None = None
        self._eval_pre: CLIPPreprocess | None = None
        self._device: Any = None
        self._size = CLIPPreprocess(model_name, train=False).image_size  # fails early on an unknown model
        if images_on_device:
            self.device_hook()  # refuses a transform it cannot reproduce now, before any compute

    @property
    def image_size(self) -> int:
        return self._size

    def train_stream(self) -> ShardStream:
        # Built here, before the loader forks its workers, so they inherit it: built lazily in each worker it cost
        # ~60 ms (open_clip's tokenizer) per worker per epoch, as workers are not persistent.
        self._train_preprocess()
        return super().train_stream()

    def _train_preprocess(self) -> CLIPPreprocess:
        if self._train_pre is None:
            self._train_pre = CLIPPreprocess(self.model_name, train=self.train_augment, seed=self.seed)
        return self._train_pre

    def train_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        preprocess = self._train_preprocess()
        if self.images_on_device:
            item = self.device_hook().item(sample, epoch)
        else:
            item = {"image": preprocess.image(sample["image"], sample["__key__"], epoch)}
        item.update(
            text=preprocess.tokens(sample["text"]),
            label=sample["label"],
            poisoned=bool(sample.get("poisoned", False)),
            key=sample["__key__"],
        )
        return item

    def device_hook(self):
        if not self.images_on_device:
            return None
        if self._device is None:
            from .device_clip import DeviceCLIPImagesHook

            self._device = DeviceCLIPImagesHook(self._train_preprocess())
        return self._device

    def _eval_transform(self):
        if self._eval_pre is None:
            self._eval_pre = CLIPPreprocess(self.model_name, train=False)
        return self._eval_pre.transform

    def tokenize(self, texts: list[str]):
        if self._eval_pre is None:
            self._eval_pre = CLIPPreprocess(self.model_name, train=False)
        return self._eval_pre.tokenizer(texts)


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CLIPDataModule", "SimCLRDataModule"]
