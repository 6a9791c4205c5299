"""Image-text pairs with unimodal augmentations: CleanCLIP's augmented views and TA-Cleaner's subtexts.

Every random choice is seeded per sample from (seed, epoch, key, purpose), like the rest of the data layer, so
the number of workers or ranks does not change a sample's augmentations and a resumed run repeats them. CleanCLIP's
EDA caption is seeded by (seed, key) alone: the authors make one augmented caption per sample for the whole run.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from poisoning.keyhash import derive_seed

from .modalities import CLIPDataModule
from .text_augment import augment_caption, negative_subtexts, positive_subtexts
from .views import CLIPPreprocess, seeded


class CleanCLIPDataModule(CLIPDataModule):
    """CLIP pairs plus ``image_aug`` and ``text_aug``, for CleanCLIP, as the authors' data code makes them:

    - ``image``: the un-augmented view, open_clip's eval transform (resize + centre crop; ``train_augment: false``,
      the default here);
    - ``image_aug``: AutoAugment (ImageNet policy) on the decoded image, then the same transform; fresh each epoch;
    - ``text_aug``: tokens of one EDA-augmented caption (``datamodules.text_augment``), made once per sample for
      the whole run (seeded by key, not by epoch: the authors augment the caption list once per data set).

    Args:
        eda_alpha: EDA's strength (share of words changed; deletion probability), Wei & Zou's 0.1.
        train_augment: False (default): resize + centre crop as above; True: open_clip's random resized crop for
            ``image`` and ``image_aug`` (clbd's earlier behaviour).
        *args, **kwargs: ``CLIPDataModule``'s. A defense sets ``poison_train: false`` (fine-tuning on clean pairs
            while evaluation applies the attack's test trigger).
    """

    def __init__(self, *args: Any, eda_alpha: float = 0.1, train_augment: bool = False, **kwargs: Any):
        super().__init__(*args, train_augment=train_augment, **kwargs)
        if not 0.0 < eda_alpha <= 1.0:
            raise ValueError(f"data.eda_alpha must be in (0, 1], got {eda_alpha}")
        self.eda_alpha = eda_alpha
        self._augmented: v2.Compose | None = None

    def _augment_image(self, image, key: str, epoch: int) -> torch.Tensor:
        if self._augmented is None:
            preprocess = self._train_pre or CLIPPreprocess(self.model_name, train=self.train_augment, seed=self.seed)
            self._augmented = v2.Compose([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), preprocess.transform])
        return seeded(self._augmented, image, derive_seed(self.seed, epoch, key, "autoaugment"))

    def train_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        item = super().train_item(sample, epoch)
        key = sample["__key__"]
        item["image_aug"] = self._augment_image(sample["image"], key, epoch)
        caption = augment_caption(sample["text"], derive_seed(self.seed, key, "eda"), alpha=self.eda_alpha)
        item["text_aug"] = self._train_pre.tokens(caption)
        return item


class TACleanerDataModule(CleanCLIPDataModule):
    """CleanCLIP's items plus TA-Cleaner's subtexts for a random share of the samples each epoch.

    A sample is chosen in an epoch when ``derive_seed(seed, epoch, key, "subtexts") < subtext_fraction * 2**63``
    (a fresh subset every epoch, independent of workers and ranks). A chosen sample carries up to ``n_positive``
    positive and ``n_negative`` negative subtexts (``datamodules.text_augment``); every sample carries the fixed
    shapes so batches stack:

    - ``subtexts``: ``[n_positive + n_negative, context_length]`` tokens, positives first, zero-padded;
    - ``subtext_mask``: ``[n_positive + n_negative]`` bool, True where a subtext was generated;
    - ``subtext_positive``: ``[n_positive + n_negative]`` bool, True for the positive slots.

    Args:
        subtext_fraction: share of samples that get subtexts in an epoch.
        n_positive: positive subtexts per chosen sample (at most).
        n_negative: negative subtexts per chosen sample (at most).
        class_words: True: the data's class names (``class_names``, from the eval index) are the words that carry a
            caption's meaning: negatives swap them first (for another class), positives keep them.
        class_word_negatives: False: negatives never swap a class word (only the caption's other listed words),
            while positives still keep it; the variant without the class-word negatives (docs/defenses.md: they
            push the target's hub caption away from every other class's images, and the target's own images with it).
    """

    def __init__(
        self,
        *args: Any,
        subtext_fraction: float = 0.25,
        n_positive: int = 2,
        n_negative: int = 2,
        class_words: bool = True,
        class_word_negatives: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not 0.0 <= subtext_fraction <= 1.0:
            raise ValueError(f"data.subtext_fraction must be in [0, 1], got {subtext_fraction}")
        if n_positive < 0 or n_negative < 0 or n_positive + n_negative < 1:
            raise ValueError(
                f"data.n_positive={n_positive}, data.n_negative={n_negative}: both >= 0 and at least one subtext"
            )
        self.subtext_fraction = subtext_fraction
        self.n_positive = n_positive
        self.n_negative = n_negative
        self.class_words = class_words
        self.class_word_negatives = class_word_negatives
        self._subtext_classes: tuple[str, ...] | None = None

    def subtext_classes(self) -> tuple[str, ...]:
        """The class names the subtexts treat as meaning-carrying words (empty with ``class_words: false``)."""
        if self._subtext_classes is None:
            self._subtext_classes = tuple(self.class_names or ()) if self.class_words else ()
        return self._subtext_classes

    def train_stream(self):
        self.subtext_classes()  # resolved before the loader forks its workers (it may read the eval index)
        return super().train_stream()

    def has_subtexts(self, key: str, epoch: int) -> bool:
        return derive_seed(self.seed, epoch, key, "subtexts") < self.subtext_fraction * 2**63

    def train_item(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        item = super().train_item(sample, epoch)
        key = sample["__key__"]
        slots = self.n_positive + self.n_negative
        tokens = torch.zeros(slots, item["text"].shape[0], dtype=item["text"].dtype)
        mask = torch.zeros(slots, dtype=torch.bool)
        if self.has_subtexts(key, epoch):
            text = sample["text"]
            classes = self.subtext_classes()
            positives = positive_subtexts(
                text, derive_seed(self.seed, epoch, key, "positive"), self.n_positive, classes
            )
            negatives = negative_subtexts(
                text,
                derive_seed(self.seed, epoch, key, "negative"),
                self.n_negative,
                classes,
                self.class_word_negatives,
            )
            for offset, texts in ((0, positives), (self.n_positive, negatives)):
                if texts:
                    tokens[offset : offset + len(texts)] = self._train_pre.tokenizer(texts)
                    mask[offset : offset + len(texts)] = True
        item["subtexts"] = tokens
        item["subtext_mask"] = mask
        item["subtext_positive"] = torch.arange(slots) < self.n_positive
        return item


__all__ = ["CleanCLIPDataModule", "TACleanerDataModule"]
