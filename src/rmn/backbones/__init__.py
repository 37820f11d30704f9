"""Routable CNN backbones (ResNet-18/50, VGG-16-BN, EfficientNet-B0) in plain PyTorch.

Each builder returns a :class:`Backbone` with three phases, ``stem`` -> ``stages`` -> ``head``;
only the stages are routed by a Routing-by-Memory Network. Build one by name with
:func:`create_backbone`; :func:`image_variant` tells which architecture variant an input size gets.
"""
from rmn.backbones.base import Backbone, BackboneInfo
from rmn.backbones.registry import create_backbone, image_variant, list_backbones, register_backbone
from rmn.backbones import efficientnet, resnet, vgg  # noqa: F401  (registers the built-in backbones)

__all__ = [
    "Backbone",
    "BackboneInfo",
    "create_backbone",
    "image_variant",
    "list_backbones",
    "register_backbone",
]
