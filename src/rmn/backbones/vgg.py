"""VGG-16 with BatchNorm under torchvision's module names.

At ``image_size`` >= 144 (the ``"imagenet"`` variant, see :func:`rmn.backbones.registry.image_variant`)
the network is torchvision's ``vgg16_bn`` (same names, so its state dict loads with ``strict=True``;
138,365,992 parameters for 1000 classes). The convolutional blocks are ``[64, 64] [128, 128]
[256 x3] [512 x3] [512 x3]``, each conv a 3x3 pad-1 conv + BN + ReLU, each block followed by a 2x2
stride-2 max-pool.

Modules: ``features`` (``nn.Sequential`` indexed as torchvision's: conv, BN, ReLU per conv, the
pools at 6, 13, 23, 33 and 43), ``avgpool``, flatten, ``classifier`` (Linear, ReLU, Dropout, Linear,
ReLU, Dropout, Linear). The routed stages are the conv blocks between poolings (paper), each with the
pool in front of it: ``features.6..12``, ``13..22``, ``23..32``, ``33..42`` (``stage_names``); the
first block's convs (``features.0..5``) run before them, ``features.43`` and the classifier after.

Variants:

* ``"imagenet"`` (>= 144): all five pools; ``avgpool`` = AdaptiveAvgPool2d(7), classifier
  Linear(512*7*7, 4096) + ReLU + Dropout + Linear(4096, 4096) + ReLU + Dropout + Linear(4096, classes).
  Needs inputs >= 32 (five 2x2 pools).
* ``"tiny"`` (49..143, Tiny ImageNet): the first two pools are dropped (``nn.Identity`` at indices
  6 and 13), as in the paper; 64x64 -> 8x8 after pool5, then the same classifier. Needs inputs >= 8.
* ``"cifar"`` (<= 48, CIFAR-100): all five pools kept (32x32 -> 1x1) and no 7x7 average pool: the
  512-vector goes to Linear(512, 4096) + ReLU + Dropout + Linear(4096, 4096) + ReLU + Dropout +
  Linear(4096, classes). Needs inputs >= 32. ``avgpool`` is an ``AdaptiveAvgPool2d(1)``, the
  identity (and parameter- and compute-free) at 32x32, which only lets the model accept larger inputs.

``width_mult`` scales every conv's channels and the 4096 hidden width: ``c -> max(1, int(round(c * w)))``.
Initialisation as torchvision: kaiming-normal (fan_out) convs with zero bias, BN weight 1 / bias 0,
linear weights normal(0, 0.01) with zero bias.
"""
from __future__ import annotations

from torch import nn

from rmn.backbones.base import FeaturesBackbone
from rmn.backbones.registry import check_min_image_size, check_options, image_variant, make_info, register_backbone

__all__ = ["VGG", "VGG16_BLOCKS", "vgg16"]

# Conv widths of the five blocks of VGG-16 (configuration "D").
VGG16_BLOCKS: list[list[int]] = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def _scale(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def _conv_block(in_channels: int, widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2, stride=2)


class VGG(FeaturesBackbone):
    """torchvision's VGG layout (``features``, ``avgpool``, ``classifier``) for VGG-16-BN."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int, width_mult: float, dropout: float) -> None:
        super().__init__()
        num_classes, image_size, in_channels, width_mult = check_options(num_classes, image_size, in_channels, width_mult)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        variant = image_variant(image_size)
        # The pool after each block; the Tiny ImageNet variant drops the first two.
        keep_pool = [variant != "tiny", variant != "tiny", True, True, True]
        min_image_size = 2 ** sum(keep_pool)  # each kept 2x2 stride-2 pool needs a side >= 2
        check_min_image_size("vgg16", image_size, variant, min_image_size)

        widths = [[_scale(c, width_mult) for c in block] for block in VGG16_BLOCKS]
        layers: list[nn.Module] = []
        block_start: list[int] = []  # index in ``features`` of each block's first conv
        channels = in_channels
        for block, pool in zip(widths, keep_pool):
            block_start.append(len(layers))
            layers += _conv_block(channels, block)
            layers.append(_pool() if pool else nn.Identity())
            channels = block[-1]
        self.features = nn.Sequential(*layers)

        hidden = _scale(4096, width_mult)
        cifar = variant == "cifar"
        self.avgpool = nn.AdaptiveAvgPool2d(1) if cifar else nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels if cifar else channels * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

        # stage i: the pool after block i, then the convs of block i + 1
        self._stem_end = block_start[1] - 1
        stage_names = [[f"features.{k}" for k in range(start - 1, end - 1)]
                       for start, end in zip(block_start[1:], block_start[2:] + [len(layers)])]
        stage_channels = [block[-1] for block in widths[:-1]]
        out_channels = [block[-1] for block in widths[1:]]
        self._declare(stage_names, stage_channels, out_channels, in_channels, min_image_size,
                      f"classifier.{len(self.classifier) - 1}",
                      make_info("vgg16", num_classes, image_size, in_channels, width_mult))
        _init_weights(self)

    def stem_modules(self) -> list[nn.Module]:
        return list(self.features[: self._stem_end])

    def head_modules(self) -> list[nn.Module]:
        return [self.features[-1], self.avgpool, nn.Flatten(1), *self.classifier]


@register_backbone("vgg16")
def vgg16(
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.5,
) -> VGG:
    """VGG-16 with BatchNorm (torchvision ``vgg16_bn`` at ImageNet size). ``dropout``: classifier dropout."""
    return VGG(num_classes, image_size, in_channels, width_mult, dropout)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
