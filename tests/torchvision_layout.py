"""Models with torchvision's module layout, written here independently of rmn's backbones (torchvision
itself cannot be imported on the test machines): what a user brings to ``rmn.route``."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's names and forward: conv1 bn1 relu maxpool layer1..4 avgpool fc. ``small``: rmn's
    small-image variant (conv1 at stride 1, maxpool an Identity: same names and tensors)."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, width: int = 64, in_channels: int = 3,
                 small: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 1 if small else 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, n in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            blocks = [block(inplanes, planes, stride)] + [block(planes * block.expansion, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3, small: bool = False) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels, small)


class ResNet50(ResNet):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes)


class FeaturesClassifier(nn.Module):
    """torchvision's VGG / EfficientNet forward: features -> avgpool -> flatten -> classifier."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16_bn(num_classes: int = 1000) -> FeaturesClassifier:
    """torchvision.models.vgg16_bn: configuration D, conv-BN-ReLU triples, pools at 6, 13, 23, 33, 43."""
    layers, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
            c = v
    classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
                               nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))
    return FeaturesClassifier(nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7)), classifier)


def conv_norm_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision.ops.misc.Conv2dNormActivation: a Sequential of conv, BatchNorm and (optionally) SiLU."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.SiLU(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation's names: avgpool fc1 fc2 activation scale_activation."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(inplace=True), nn.Sigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class MBConv(nn.Module):
    """torchvision's MBConv: ``block`` ([expand], depthwise, SE, project) and ``stochastic_depth`` (no tensors;
    the identity in eval, which is all these tests run)."""

    def __init__(self, ratio: int, k: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        exp = cin * ratio
        self.block = nn.Sequential(*([conv_norm_act(cin, exp, 1)] if ratio != 1 else []),
                                   conv_norm_act(exp, exp, k, stride, exp), SqueezeExcitation(exp, max(1, cin // 4)),
                                   conv_norm_act(exp, cout, 1, act=False))
        self.stochastic_depth = nn.Identity()
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        return self.block(x) + x if self.res else self.block(x)


def efficientnet_b0(num_classes: int = 1000) -> FeaturesClassifier:
    """torchvision.models.efficientnet_b0 at full width: features 0 (stem), 1-7 (MBConv groups), 8 (1x1 conv)."""
    settings = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    groups = [nn.Sequential(*[MBConv(r, k, s if i == 0 else 1, cin if i == 0 else cout, cout) for i in range(n)])
              for r, k, s, cin, cout, n in settings]
    features = nn.Sequential(conv_norm_act(3, 32, 3, 2), *groups, conv_norm_act(320, 1280, 1))
    classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(1280, num_classes))
    return FeaturesClassifier(features, nn.AdaptiveAvgPool2d(1), classifier)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (as a trained model has),
    so that an eval-mode comparison exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def _conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class EfficientNetLayout(nn.Module):
    """torchvision.models.efficientnet_b0's top-level layout at toy widths: ``features`` 0 (stem), 1-7 (block
    groups, stride 2 at 2, 3, 4 and 6 as in B0), 8 (final 1x1 conv); ``avgpool``; ``classifier`` (Dropout, Linear)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        plan = [(8, 8, 1), (8, 12, 2), (12, 16, 2), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1)]
        self.features = nn.Sequential(_conv_bn_act(3, 8, 3, 2), *[_conv_bn_act(a, b, 3, s) for a, b, s in plan],
                                      _conv_bn_act(32, 64, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
