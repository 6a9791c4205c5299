"""ResNet trunks (CIFAR stem, narrow widths), the projection head, and the tiny open_clip configs."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torchvision
from PIL import Image

from lightning_modules.backbones import (
    clbd_model_config_names,
    projection_head,
    register_model_configs,
    resnet_backbone,
)


@pytest.mark.parametrize(
    ("name", "cifar_stem", "width", "feature_dim"),
    [
        ("resnet18", True, None, 512),
        ("resnet18", False, None, 512),
        ("resnet34", True, None, 512),
        ("resnet50", True, None, 2048),
        ("resnet18", True, 16, 128),
        ("resnet18", True, 32, 256),
        ("resnet34", False, 8, 64),
    ],
)
def test_resnet_backbone_feature_dim(name, cifar_stem, width, feature_dim):
    model, dim = resnet_backbone(name, cifar_stem=cifar_stem, width=width)
    assert dim == feature_dim
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feature_dim)


def test_cifar_stem_keeps_spatial_resolution():
    model, _ = resnet_backbone("resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    # 32 px in, 4x4 before pooling (three stride-2 stages only)
    x = torch.randn(1, 3, 32, 32)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    assert x.shape[-2:] == (4, 4)


def test_narrow_resnet_at_width_64_has_torchvision_layout():
    narrow, _ = resnet_backbone("resnet18", cifar_stem=False, width=64)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    narrow.load_state_dict(reference.state_dict())
    narrow.eval()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(narrow(x), reference(x))


def test_narrow_resnet_is_smaller():
    full, _ = resnet_backbone("resnet18", cifar_stem=True)
    narrow, _ = resnet_backbone("resnet18", cifar_stem=True, width=16)
    n_full = sum(p.numel() for p in full.parameters())
    n_narrow = sum(p.numel() for p in narrow.parameters())
    assert n_narrow * 10 < n_full


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        resnet_backbone("resnet19", cifar_stem=True)
    with pytest.raises(ValueError, match="basic-block"):
        resnet_backbone("resnet50", cifar_stem=True, width=16)
    with pytest.raises(ValueError, match="positive"):
        resnet_backbone("resnet18", cifar_stem=True, width=0)


def test_projection_head_layout():
    head = projection_head(512, 512, 128)
    kinds = [type(m) for m in head]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_register_model_configs_is_idempotent():
    names = register_model_configs()
    assert names == clbd_model_config_names() == ["clip-tiny-rn", "clip-tiny-vit"]
    n_models = len(open_clip.list_models())
    assert register_model_configs() == names
    assert len(open_clip.list_models()) == n_models
    assert set(names) <= set(open_clip.list_models())


@pytest.mark.parametrize("name", ["clip-tiny-vit", "clip-tiny-rn"])
def test_tiny_clip_models_build_offline_and_run(name):
    register_model_configs()
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    assert tokenizer.context_length == 32
    image = preprocess_val(Image.new("RGB", (48, 40), color=(200, 30, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    tokens = tokenizer(["a photo of a red square.", " ".join(["word"] * 100)])
    assert tokens.shape == (2, 32)
    # an over-long caption is truncated and still ends with the end-of-text token the text tower pools on
    assert tokens[1, -1].item() == tokens.max().item()
    image_features, text_features, logit_scale = model(image.repeat(2, 1, 1, 1), tokens)
    assert image_features.shape == text_features.shape == (2, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    assert logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
