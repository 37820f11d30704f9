"""VGG-16 with BatchNorm split into the three phases of a Routing-by-Memory Network.

At ``image_size`` >= 144 (the ``"imagenet"`` variant, see :func:`rmn.backbones.registry.image_variant`)
the network is identical to torchvision's ``vgg16_bn`` (138,365,992 parameters for 1000 classes).
The convolutional blocks are ``[64, 64] [128, 128] [256 x3] [512 x3] [512 x3]``, each conv a
3x3 pad-1 conv + BN + ReLU, the blocks separated by 2x2 stride-2 max-pools.

Phases (stages are the conv blocks between poolings, paper):

* ``stem``: the first block's convs (64, 64), without its pool;
* ``stages``: ``[pool1, 128, 128]``, ``[pool2, 256 x3]``, ``[pool3, 512 x3]``, ``[pool4, 512 x3]``;
* ``head``: ``pool5`` + the classifier.

Variants:

* ``"imagenet"`` (>= 144): all five pools; classifier = AdaptiveAvgPool2d(7) + Flatten +
  Linear(512*7*7, 4096) + ReLU + Dropout + Linear(4096, 4096) + ReLU + Dropout + Linear(4096, classes).
  Needs inputs >= 32 (five 2x2 pools).
* ``"tiny"`` (49..143, Tiny ImageNet): the first two pools are dropped (``Identity``), as in the paper;
  64x64 -> 8x8 after pool5, then the same AdaptiveAvgPool2d(7) classifier. Needs inputs >= 8.
* ``"cifar"`` (<= 48, CIFAR-100): all five pools kept (32x32 -> 1x1) and no 7x7 average pool: the
  512-vector goes to Linear(512, 4096) + ReLU + Dropout + Linear(4096, 4096) + ReLU + Dropout +
  Linear(4096, classes). Needs inputs >= 32. The flatten is preceded by an ``AdaptiveAvgPool2d(1)``,
  which is the identity (and parameter- and compute-free) at 32x32 and only lets the model accept
  larger inputs.

``width_mult`` scales every conv's channels and the 4096 hidden width: ``c -> max(1, int(round(c * w)))``.
Initialisation as torchvision: kaiming-normal (fan_out) convs with zero bias, BN weight 1 / bias 0,
linear weights normal(0, 0.01) with zero bias.
"""
from __future__ import annotations

from torch import nn

from rmn.backbones.base import Backbone
from rmn.backbones.registry import check_min_image_size, check_options, image_variant, make_info, register_backbone

__all__ = ["VGG16_BLOCKS", "vgg16"]

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


@register_backbone("vgg16")
def vgg16(
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.5,
) -> Backbone:
    """VGG-16 with BatchNorm (torchvision ``vgg16_bn`` at ImageNet size). ``dropout``: classifier dropout."""
    num_classes, image_size, in_channels, width_mult = check_options(num_classes, image_size, in_channels, width_mult)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    variant = image_variant(image_size)
    # Pools in front of stages 1..4 and of the head; the Tiny ImageNet variant drops the first two.
    keep_pool = [variant != "tiny", variant != "tiny", True, True, True]
    min_image_size = 2 ** sum(keep_pool)  # each kept 2x2 stride-2 pool needs a side >= 2
    check_min_image_size("vgg16", image_size, variant, min_image_size)

    widths = [[_scale(c, width_mult) for c in block] for block in VGG16_BLOCKS]
    stem = nn.Sequential(*_conv_block(in_channels, widths[0]))

    stages: list[nn.Module] = []
    stage_channels: list[int] = []
    out_channels: list[int] = []
    channels = widths[0][-1]
    for i, block in enumerate(widths[1:]):
        pool: nn.Module = _pool() if keep_pool[i] else nn.Identity()
        stages.append(nn.Sequential(pool, *_conv_block(channels, block)))
        stage_channels.append(channels)
        channels = block[-1]
        out_channels.append(channels)

    hidden = _scale(4096, width_mult)
    if variant == "cifar":
        pooling: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        features = channels
    else:
        pooling = [nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(1)]
        features = channels * 7 * 7
    head = nn.Sequential(
        _pool(),
        *pooling,
        nn.Linear(features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )

    model = Backbone(
        stem=stem,
        stages=stages,
        head=head,
        stage_channels=stage_channels,
        out_channels=out_channels,
        in_channels=in_channels,
        min_image_size=min_image_size,
        info=make_info("vgg16", num_classes, image_size, in_channels, width_mult),
    )
    _init_weights(model)
    return model


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
