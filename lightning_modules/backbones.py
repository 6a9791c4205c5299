"""Image backbones, the MLP heads of the image methods, and the tiny open_clip configs shipped with clbd."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from datamodules.openclip_configs import clbd_model_config_names, register_model_configs

__all__ = [
    "clbd_model_config_names",
    "mlp_head",
    "projection_head",
    "register_model_configs",
    "resnet_backbone",
    "resnet_names",
]


# name -> (torchvision constructor, blocks per stage, residual block type)
_RESNETS = {
    "resnet18": (torchvision.models.resnet18, (2, 2, 2, 2), BasicBlock),
    "resnet34": (torchvision.models.resnet34, (3, 4, 6, 3), BasicBlock),
    "resnet50": (torchvision.models.resnet50, (3, 4, 6, 3), torchvision.models.resnet.Bottleneck),
}


def resnet_names() -> list[str]:
    return sorted(_RESNETS)


class NarrowResNet(nn.Module):
    """A torchvision-layout ResNet with basic blocks and stage widths (w, 2w, 4w, 8w) for any base width w.

    torchvision's ``ResNet`` fixes the stage widths at 64..512 (its ``width_per_group`` only widens bottlenecks), so
    narrow ResNet-18/34 for CPU smoke runs are built here from torchvision's ``BasicBlock``. Attribute names follow
    torchvision, so with ``base_width=64`` the state dict matches ``torchvision.models.resnet18()``'s.
    """

    def __init__(self, blocks_per_stage: tuple[int, int, int, int], base_width: int) -> None:
        super().__init__()
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(base_width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(base_width * 2, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(base_width * 4, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(base_width * 8, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module = nn.Identity()
        # same initialisation as torchvision's ResNet
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_backbone(name: str, cifar_stem: bool, width: int | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet trunk that returns pooled features, and the feature dimension.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50`` (torchvision layouts, ``weights=None``).
        cifar_stem: replace the 7x7/2 stem conv and the max-pool by one 3x3/1 conv (for 32 px images).
        width: base width of a narrow ResNet-18/34 (torchvision's is 64; e.g. 16 or 32 for CPU smoke runs).
            ``None`` keeps torchvision's model. Not available for the bottleneck ``resnet50``.
    """
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone name {name!r}; valid names: {', '.join(resnet_names())}")
    constructor, blocks, block = _RESNETS[name]
    if width is None:
        model = constructor(weights=None)
        base_width = 64
    else:
        if block is not BasicBlock:
            raise ValueError(f"backbone width={width} is only supported for basic-block ResNets (resnet18, resnet34)")
        if width < 1:
            raise ValueError(f"backbone width must be a positive integer, got {width}")
        model = NarrowResNet(blocks, base_width=width)
        base_width = width
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, base_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    feature_dim = base_width * 8 * block.expansion
    model.fc = nn.Identity()
    return model, feature_dim


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's MLP projection head: Linear - BatchNorm1d - ReLU - Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def mlp_head(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True, output_norm: bool = False
) -> nn.Sequential:
    """An MLP head of ``layers`` linear layers: hidden ones followed by [BatchNorm1d] and ReLU.

    MoCo v2's projector: 2 layers without batch norm. BYOL's projector and predictor: 2 layers with batch norm
    (``projection_head``'s layout). SimSiam's projector: 3 layers with batch norm, the output batch-normalised too.
    """
    if layers < 1:
        raise ValueError(f"mlp_head: layers must be >= 1, got {layers}")
    modules: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    for i, dim in enumerate(dims[:-1]):
        modules += [nn.Linear(dim, dims[i + 1])]
        modules += [nn.BatchNorm1d(dims[i + 1])] if batch_norm else []
        modules += [nn.ReLU(inplace=True)]
    modules.append(nn.Linear(dims[-1], out_dim))
    if output_norm:
        modules.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*modules)
