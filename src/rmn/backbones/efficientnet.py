"""EfficientNet-B0 under torchvision's module names.

At ``image_size`` >= 144 (the ``"imagenet"`` variant, see :func:`rmn.backbones.registry.image_variant`)
the network is torchvision's ``efficientnet_b0`` (same names, so its state dict loads with
``strict=True``; 5,288,548 parameters for 1000 classes; same layers, BatchNorm settings, stochastic
depth and initialisation).

Modules: ``features`` = ``0`` the stem conv3x3 stride 2 (32 channels) + BN + SiLU (an
``nn.Sequential``, as torchvision's ``Conv2dNormActivation``), ``1..7`` the MBConv groups MB1..MB7
(each an ``nn.Sequential`` of :class:`MBConv`, whose ``block`` holds the conv-BN-act sequentials and
the :class:`SqueezeExcitation` with ``fc1``/``fc2``, plus ``stochastic_depth``), ``8`` the final
conv1x1 320->1280 + BN + SiLU; then ``avgpool``, flatten, ``classifier`` (Dropout, Linear).

MBConv groups (expand ratio, kernel, stride, in, out, repeats)::

    MB1 (1, 3, 1,  32,  16, 1)    MB2 (6, 3, 2,  16,  24, 2)    MB3 (6, 5, 2,  24,  40, 2)
    MB4 (6, 3, 2,  40,  80, 3)    MB5 (6, 5, 1,  80, 112, 3)    MB6 (6, 5, 2, 112, 192, 4)
    MB7 (6, 3, 1, 192, 320, 1)

Each MBConv: [1x1 expand conv + BN + SiLU, when the ratio is not 1] + depthwise kxk conv (the
group's stride on its first block) + BN + SiLU + squeeze-excitation (squeeze width
``max(1, block_input_channels // 4)``, SiLU, sigmoid) + 1x1 project conv + BN; residual when the
stride is 1 and in == out, through row-wise stochastic depth whose probability grows linearly over the
16 blocks from 0 to ``drop_path_rate * 15 / 16`` (torchvision's schedule; identity in eval).

Routed stages (the paper splits at down-sampling; the grouping by resolution is our reading, the one
the paper's parameter counts fit): ``{MB1}``, ``{MB2}``, ``{MB3}``, ``{MB4, MB5}``, ``{MB6, MB7, final
conv}``, i.e. ``stage_names`` = ``[["features.1"], ["features.2"], ["features.3"], ["features.4",
"features.5"], ["features.6", "features.7", "features.8"]]``.

Small-image variant (``image_size`` <= 143: CIFAR-100, Tiny ImageNet): the first two down-samplings
are dropped (the stem conv and the first MB2 block use stride 1).

``width_mult`` scales channels with torchvision's rounding to multiples of 8 (:func:`make_divisible`);
the final conv has ``4 x`` the (scaled) 320 channels, i.e. 1280 at width 1. Every stride-2 conv is
padded, so any input side >= 1 is accepted (``min_image_size == 1``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rmn.backbones.base import FeaturesBackbone
from rmn.backbones.registry import check_min_image_size, check_options, image_variant, make_info, register_backbone

__all__ = ["EfficientNet", "MBConv", "SqueezeExcitation", "StochasticDepth", "make_divisible", "efficientnet_b0", "B0_SETTINGS"]

# (expand_ratio, kernel, stride, in_channels, out_channels, num_layers) of MB1..MB7.
B0_SETTINGS: list[tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]

# Which MBConv groups (0-based, ``features.{g + 1}``) form each routed stage; the last stage also
# gets the final 1x1 conv (``features.8``).
B0_STAGE_GROUPS: list[list[int]] = [[0], [1], [2], [3, 4], [5, 6]]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going down by more than 10%."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv (no bias, 'same'-style padding) + BatchNorm + optional SiLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
            groups=groups, bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class StochasticDepth(nn.Module):
    """Drop whole residual branches per sample ("row" mode) with probability ``p`` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
        noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


class SqueezeExcitation(nn.Module):
    """SE block: ``x * sigmoid(fc2(silu(fc1(GAP(x)))))`` with 1x1 convs (with bias) as the FCs."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (EfficientNet's block)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        drop_prob: float,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        self.use_res_connect = stride == 1 and in_channels == out_channels
        expanded = make_divisible(in_channels * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv_bn_act(in_channels, expanded, 1))
        layers.append(conv_bn_act(expanded, expanded, kernel_size, stride=stride, groups=expanded))
        layers.append(SqueezeExcitation(expanded, max(1, in_channels // 4)))
        layers.append(conv_bn_act(expanded, out_channels, 1, activation=False))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_prob)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result = result + x
        return result


class EfficientNet(FeaturesBackbone):
    """torchvision's EfficientNet layout (``features``, ``avgpool``, ``classifier``) for B0."""

    def __init__(
        self, num_classes: int, image_size: int, in_channels: int, width_mult: float, dropout: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        num_classes, image_size, in_channels, width_mult = check_options(num_classes, image_size, in_channels, width_mult)
        for option, value in (("dropout", dropout), ("drop_path_rate", drop_path_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{option} must be a probability in [0, 1], got {value!r}")
        variant = image_variant(image_size)
        small = variant != "imagenet"
        min_image_size = 1  # all stride-2 convs are padded
        check_min_image_size("efficientnet_b0", image_size, variant, min_image_size)

        settings = [
            (e, k, s, make_divisible(cin * width_mult, 8), make_divisible(cout * width_mult, 8), n)
            for e, k, s, cin, cout, n in B0_SETTINGS
        ]
        if small:  # drop the first two down-samplings: the stem conv and the first MB2 block
            e, k, _, cin, cout, n = settings[1]
            settings[1] = (e, k, 1, cin, cout, n)

        layers: list[nn.Module] = [conv_bn_act(in_channels, settings[0][3], 3, stride=1 if small else 2)]
        total_blocks = sum(n for *_, n in settings)
        block_id = 0
        for expand, kernel, stride, cin, cout, num_layers in settings:
            group: list[nn.Module] = []
            for i in range(num_layers):
                drop_prob = drop_path_rate * float(block_id) / total_blocks
                group.append(MBConv(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1, drop_prob))
                block_id += 1
            layers.append(nn.Sequential(*group))
        last_in = settings[-1][4]
        last_channels = 4 * last_in
        layers.append(conv_bn_act(last_in, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channels, num_classes))

        stage_names = [[f"features.{g + 1}" for g in groups] for groups in B0_STAGE_GROUPS]
        stage_names[-1].append(f"features.{len(layers) - 1}")
        stage_channels = [settings[groups[0]][3] for groups in B0_STAGE_GROUPS]
        out_channels = [settings[groups[-1]][4] for groups in B0_STAGE_GROUPS[:-1]] + [last_channels]
        self._declare(stage_names, stage_channels, out_channels, in_channels, min_image_size, "classifier.1",
                      make_info("efficientnet_b0", num_classes, image_size, in_channels, width_mult))
        _init_weights(self)

    def stem_modules(self) -> list[nn.Module]:
        return list(self.features[0])

    def head_modules(self) -> list[nn.Module]:
        return [self.avgpool, nn.Flatten(1), *self.classifier]


@register_backbone("efficientnet_b0")
def efficientnet_b0(
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.2,
    drop_path_rate: float = 0.2,
) -> EfficientNet:
    """EfficientNet-B0. ``dropout``: before the classifier; ``drop_path_rate``: stochastic depth."""
    return EfficientNet(num_classes, image_size, in_channels, width_mult, dropout, drop_path_rate)


def _init_weights(model: nn.Module) -> None:
    """torchvision's EfficientNet init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_range = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -init_range, init_range)
            nn.init.zeros_(m.bias)
