"""LARS against hand-computed steps, open_clip's no-decay rule, warmup-cosine factors."""

from __future__ import annotations

import functools
import math

import open_clip
import pytest
import torch
from torch import nn

from lightning_modules.backbones import register_model_configs, resnet_backbone
from lightning_modules.optim import LARS, param_groups_no_decay, warmup_cosine


def two_params() -> tuple[nn.Parameter, nn.Parameter]:
    # weight parallel to its gradient keeps the arithmetic exact: ||w|| = 5, ||g|| = 1
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    return weight, bias


def set_grads(weight: nn.Parameter, bias: nn.Parameter) -> None:
    weight.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    bias.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)


def test_lars_two_steps_by_hand():
    weight, bias = two_params()
    opt = LARS([weight, bias], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    set_grads(weight, bias)
    opt.step()
    # weight: d = g + 0.1 w = [0.9, 1.2]; trust = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; buf = [0.06, 0.08]
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.97, 3.96]], dtype=torch.float64))
    # bias (1-D): excluded, plain momentum SGD without decay: buf = [0.5, 0.5]
    torch.testing.assert_close(bias.detach(), torch.tensor([0.75, -2.25], dtype=torch.float64))

    set_grads(weight, bias)
    opt.step()
    # weight: ||w|| = 4.95; d = [0.897, 1.196]; trust = 0.099 / 1.495; d * trust = [0.0594, 0.0792]
    # buf = 0.9 * [0.06, 0.08] + [0.0594, 0.0792] = [0.1134, 0.1512]; w -= 0.5 * buf
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.9133, 3.8844]], dtype=torch.float64))
    # bias: buf = 0.9 * 0.5 + 0.5 = 0.95
    torch.testing.assert_close(bias.detach(), torch.tensor([0.275, -2.725], dtype=torch.float64))


def test_lars_clip_caps_local_lr_at_global_lr():
    weight, bias = two_params()
    # trust = 1/15 > lr = 0.01, so the clipped local lr is lr itself: w -= 0.01 * (g + 0.1 w) = [0.009, 0.012]
    opt = LARS([weight], lr=0.01, momentum=0.0, weight_decay=0.1, clip_lr=True)
    set_grads(weight, bias)
    opt.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.991, 3.988]], dtype=torch.float64))
    # unclipped: trust * lr = 1/1500
    weight2, _ = two_params()
    opt = LARS([weight2], lr=0.01, momentum=0.0, weight_decay=0.1, clip_lr=False)
    set_grads(weight2, bias)
    opt.step()
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64) - torch.tensor([[0.9, 1.2]], dtype=torch.float64) / 1500
    torch.testing.assert_close(weight2.detach(), expected)


def test_lars_group_exclusion_and_nesterov():
    weight, bias = two_params()
    opt = LARS([{"params": [weight], "lars_exclude": True}], lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=True)
    set_grads(weight, bias)
    opt.step()
    # excluded: d = g (no decay, no trust ratio); nesterov: g + 0.9 * buf = 1.9 g
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0 - 0.57, 4.0 - 0.76]], dtype=torch.float64))


def test_lars_zero_weight_uses_unit_trust():
    weight = nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    opt = LARS([weight], lr=0.5, momentum=0.0)
    weight.grad = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([[-0.5, -1.0]], dtype=torch.float64))


def test_lars_rejects_bad_hyperparameters():
    weight, _ = two_params()
    with pytest.raises(ValueError, match="eta"):
        LARS([weight], lr=0.1, eta=0.0)
    with pytest.raises(ValueError, match="lr"):
        LARS([weight], lr=-1.0)


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {ids[id(p)] for p in g["params"]} for g in groups}


def test_no_decay_groups_follow_open_clip_rule_on_clip():
    register_model_configs()
    model = open_clip.create_model("clip-tiny-vit", pretrained=None)
    groups = param_groups_no_decay(model, weight_decay=0.1)
    by_name = names_by_group(model, groups)
    assert by_name["decay"].isdisjoint(by_name["no_decay"])
    assert by_name["decay"] | by_name["no_decay"] == {n for n, _ in model.named_parameters()}
    for name in ("logit_scale", "visual.class_embedding", "visual.ln_pre.weight", "ln_final.bias"):
        assert name in by_name["no_decay"]
    for name in ("visual.conv1.weight", "positional_embedding", "token_embedding.weight", "text_projection"):
        assert name in by_name["decay"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


def test_no_decay_groups_on_resnet_and_frozen_parameters():
    model, _ = resnet_backbone("resnet18", cifar_stem=True, width=8)
    model.layer4.requires_grad_(False)
    by_name = names_by_group(model, param_groups_no_decay(model, weight_decay=1e-4))
    assert "bn1.weight" in by_name["no_decay"]
    assert "layer2.0.downsample.1.weight" in by_name["no_decay"]
    assert "layer2.0.downsample.0.weight" in by_name["decay"]
    assert not any(n.startswith("layer4") for names in by_name.values() for n in names)


def test_warmup_cosine_factors():
    f = functools.partial(warmup_cosine, warmup_steps=10, total_steps=110, base=1.0, final=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(5, 0, 10, base=2.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_warmup_cosine_drives_lambda_lr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(warmup_cosine, warmup_steps=2, total_steps=4, base=0.4, final=0.04)
    )
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.22, 0.04])


def test_warmup_cosine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base"):
        warmup_cosine(0, 1, 10, base=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 20, 10, base=1.0)
