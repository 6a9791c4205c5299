"""Zero-shot classifiers for CLIP models: class names x prompt templates, via open_clip's own builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier as _open_clip_build
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn

CIFAR10_CLASSNAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# The 18 CIFAR-10 templates CLIP's authors used for the paper's zero-shot numbers (openai/CLIP, data/prompts.md).
CIFAR10_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

PHOTO_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 ImageNet class names open_clip uses for zero-shot evaluation."""
    return tuple(IMAGENET_CLASSNAMES)


def openai_imagenet_templates() -> tuple[Callable[[str], str], ...]:
    """The 80 ImageNet prompt templates of CLIP's authors (callables, as open_clip stores them)."""
    return tuple(OPENAI_IMAGENET_TEMPLATES)


def simple_imagenet_templates() -> tuple[Callable[[str], str], ...]:
    """open_clip's reduced set of 7 ImageNet templates."""
    return tuple(SIMPLE_IMAGENET_TEMPLATES)


_TEMPLATES: dict[str, Callable[[], Sequence[str | Callable[[str], str]]]] = {
    "openai_imagenet": openai_imagenet_templates,
    "simple_imagenet": simple_imagenet_templates,
    "cifar10": lambda: CIFAR10_TEMPLATES,
    "photo": lambda: PHOTO_TEMPLATES,
}

_CLASSNAMES: dict[str, Callable[[], tuple[str, ...]]] = {
    "cifar10": lambda: CIFAR10_CLASSNAMES,
    "imagenet": imagenet_classnames,
}


def templates_by_name(name: str) -> tuple[str | Callable[[str], str], ...]:
    """Prompt templates by name: ``openai_imagenet``, ``simple_imagenet``, ``cifar10`` or ``photo``.

    Templates are format strings with one ``{}`` or callables taking the class name.
    """
    if name not in _TEMPLATES:
        raise ValueError(f"unknown template set {name!r}; valid names: {', '.join(sorted(_TEMPLATES))}")
    return tuple(_TEMPLATES[name]())


def classnames_by_name(name: str) -> tuple[str, ...]:
    """Class names by dataset name: ``cifar10`` or ``imagenet``."""
    if name not in _CLASSNAMES:
        raise ValueError(f"unknown class-name set {name!r}; valid names: {', '.join(sorted(_CLASSNAMES))}")
    return _CLASSNAMES[name]()


def fill_template(template: str | Callable[[str], str], class_name: str) -> str:
    """A template with the class name filled in (format string or callable)."""
    return template.format(class_name) if isinstance(template, str) else template(class_name)


def build_zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device = "cpu",
    num_classes_per_batch: int | None = 10,
) -> Tensor:
    """Zero-shot classifier weights ``[D, C]``: per class, the normalised mean of the normalised text embeddings of
    all its prompts (open_clip's ``build_zero_shot_classifier``). Class scores of normalised image features are
    ``image_features @ weights``. Runs without gradient; the model's train/eval mode is left to the caller.
    """
    if len(class_names) == 0:
        raise ValueError("build_zero_shot_classifier: class_names is empty")
    if len(templates) == 0:
        raise ValueError("build_zero_shot_classifier: templates is empty")
    kinds = {isinstance(t, str) for t in templates}
    if len(kinds) > 1:
        raise ValueError("build_zero_shot_classifier: templates must be all format strings or all callables")
    bad = [t for t in templates if isinstance(t, str) and t.count("{}") != 1]
    if bad:
        raise ValueError(f"build_zero_shot_classifier: each template needs exactly one '{{}}' placeholder: {bad[:3]}")
    if not hasattr(model, "encode_text"):
        raise ValueError(f"build_zero_shot_classifier: model {type(model).__name__} has no encode_text (not a CLIP?)")
    return _open_clip_build(
        model,
        tokenizer,
        classnames=list(class_names),
        templates=list(templates),
        num_classes_per_batch=num_classes_per_batch,
        device=device,
    )
