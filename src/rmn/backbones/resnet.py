"""ResNet-18 / ResNet-50 under torchvision's module names.

At ``image_size`` >= 144 (the ``"imagenet"`` variant, see :func:`rmn.backbones.registry.image_variant`)
the network is torchvision's ``resnet18`` / ``resnet50``: same modules under the same names (a
torchvision state dict loads with ``strict=True``), same forward, parameter count, multiply-adds and
initialisation. Bottleneck is ResNet v1.5 (stride on the 3x3 conv).

Modules, in forward order: ``conv1`` (7x7, stride 2, no bias), ``bn1``, ``relu``, ``maxpool``
(3x3 stride 2), ``layer1 .. layer4`` (each an ``nn.Sequential`` of residual blocks with ``conv1 bn1
conv2 bn2 [conv3 bn3] downsample``), ``avgpool``, flatten, ``fc``. The routed stages are
``layer1 .. layer4`` (``stage_names``).

Small-image variant (``image_size`` <= 143: CIFAR-100 at 32x32, Tiny ImageNet at 64x64): the first
two down-samplings are dropped, as in the paper. ``conv1`` keeps its 7x7 kernel and padding 3 but
uses stride 1, and ``maxpool`` is an ``nn.Identity`` (same names and parameters; ResNet-18 at 64x64
then costs 2.25 G multiply-adds, the paper's figure).

``width_mult`` scales every channel count: ``c -> max(1, int(round(c * width_mult)))``.
Every stride-2 layer pads enough to give at least one output pixel, so any input side >= 1 is accepted
(``min_image_size == 1``).
"""
from __future__ import annotations

from typing import Type, Union

import torch
from torch import Tensor, nn

from rmn.backbones.base import NamedBackbone
from rmn.backbones.registry import check_min_image_size, check_options, image_variant, make_info, register_backbone

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _scale(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or conv1x1 + BN) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


Block = Type[Union[BasicBlock, Bottleneck]]


def _make_layer(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    for _ in range(1, blocks):
        layers.append(block(planes * block.expansion, planes))
    return nn.Sequential(*layers)


class ResNet(NamedBackbone):
    """torchvision's ResNet layout; ``layers`` gives the number of blocks of ``layer1..layer4``."""

    def __init__(
        self,
        name: str,
        block: Block,
        layers: list[int],
        num_classes: int,
        image_size: int,
        in_channels: int,
        width_mult: float,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        num_classes, image_size, in_channels, width_mult = check_options(num_classes, image_size, in_channels, width_mult)
        variant = image_variant(image_size)
        small = variant != "imagenet"
        min_image_size = 1  # every stride-2 conv / pool is padded: a 1x1 input still gives 1x1 maps
        check_min_image_size(name, image_size, variant, min_image_size)

        stem_width = _scale(64, width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=1 if small else 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        stage_channels: list[int] = []
        out_channels: list[int] = []
        inplanes = stem_width
        for i, blocks in enumerate(layers):
            planes = _scale(64 * 2**i, width_mult)
            self.add_module(f"layer{i + 1}", _make_layer(block, inplanes, planes, blocks, stride=1 if i == 0 else 2))
            stage_channels.append(inplanes)
            inplanes = planes * block.expansion
            out_channels.append(inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

        self._declare([f"layer{i + 1}" for i in range(len(layers))], stage_channels, out_channels, in_channels,
                      min_image_size, "fc", make_info(name, num_classes, image_size, in_channels, width_mult))
        _init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, self.maxpool]

    def head_modules(self) -> list[nn.Module]:
        return [self.avgpool, nn.Flatten(1), self.fc]


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's ResNet init (the Linear keeps PyTorch's default init, as in torchvision)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


@register_backbone("resnet18")
def resnet18(
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (torchvision-identical at ImageNet size: 11,689,512 parameters for 1000 classes)."""
    return ResNet("resnet18", BasicBlock, [2, 2, 2, 2], num_classes, image_size, in_channels, width_mult,
                  zero_init_residual)


@register_backbone("resnet50")
def resnet50(
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1.5 (torchvision-identical at ImageNet size: 25,557,032 parameters for 1000 classes)."""
    return ResNet("resnet50", Bottleneck, [3, 4, 6, 3], num_classes, image_size, in_channels, width_mult,
                  zero_init_residual)

