"""Zero-shot classifier on a tiny open_clip model, template and class-name sets."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.backbones import register_model_configs
from lightning_modules.zero_shot import (
    CIFAR10_CLASSNAMES,
    CIFAR10_TEMPLATES,
    build_zero_shot_classifier,
    classnames_by_name,
    fill_template,
    templates_by_name,
)


@pytest.fixture(scope="module")
def tiny_clip():
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clip-tiny-vit", pretrained=None).eval()
    return model, open_clip.get_tokenizer("clip-tiny-vit")


def test_classifier_is_mean_of_normalised_prompt_embeddings(tiny_clip):
    model, tokenizer = tiny_clip
    templates = templates_by_name("cifar10")
    weights = build_zero_shot_classifier(model, tokenizer, CIFAR10_CLASSNAMES, templates, num_classes_per_batch=3)
    assert weights.shape == (64, 10)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(10))
    for c in (0, 7):
        with torch.no_grad():
            texts = tokenizer([fill_template(t, CIFAR10_CLASSNAMES[c]) for t in templates])
            expected = F.normalize(F.normalize(model.encode_text(texts), dim=-1).mean(0), dim=0)
        torch.testing.assert_close(weights[:, c], expected, rtol=1e-5, atol=1e-6)


def test_classifier_with_callable_templates(tiny_clip):
    model, tokenizer = tiny_clip
    weights = build_zero_shot_classifier(model, tokenizer, ["banana", "cat"], templates_by_name("simple_imagenet"))
    assert weights.shape == (64, 2)
    assert not torch.allclose(weights[:, 0], weights[:, 1])


def test_template_and_classname_sets():
    assert len(templates_by_name("openai_imagenet")) == 80
    assert len(templates_by_name("simple_imagenet")) == 7
    assert templates_by_name("cifar10") == CIFAR10_TEMPLATES and len(CIFAR10_TEMPLATES) == 18
    assert templates_by_name("photo") == ("a photo of a {}.",)
    assert fill_template(templates_by_name("openai_imagenet")[0], "banana") == "a bad photo of a banana."
    assert len(classnames_by_name("imagenet")) == 1000 and classnames_by_name("imagenet")[954] == "banana"
    assert classnames_by_name("cifar10")[0] == "airplane"


def test_unknown_names_and_bad_templates_are_rejected(tiny_clip):
    model, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="cifar10, openai_imagenet, photo, simple_imagenet"):
        templates_by_name("openai")
    with pytest.raises(ValueError, match="cifar10, imagenet"):
        classnames_by_name("cifar100")
    with pytest.raises(ValueError, match="placeholder"):
        build_zero_shot_classifier(model, tokenizer, ["cat"], ["a photo of a cat."])
    with pytest.raises(ValueError, match="empty"):
        build_zero_shot_classifier(model, tokenizer, [], ["a photo of a {}."])
    with pytest.raises(ValueError, match="encode_text"):
        build_zero_shot_classifier(torch.nn.Linear(2, 2), tokenizer, ["cat"], ["a photo of a {}."])
