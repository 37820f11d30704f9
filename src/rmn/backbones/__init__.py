"""Routable CNN backbones (ResNet-18/50, VGG-16-BN, EfficientNet-B0) in plain PyTorch.

rmn's own (:class:`NamedBackbone`) keep torchvision's module names, so torchvision state dicts load
as they are, and name their routed stages in ``stage_names``; a user's CNN can be any ``nn.Module``
(or a :class:`Backbone` given as ``stem``, ``stages`` and ``head``). Build one by name with
:func:`create_backbone`; :func:`image_variant` tells which architecture variant an input size gets.
"""
from rmn.backbones.base import Backbone, BackboneInfo, NamedBackbone
from rmn.backbones.registry import create_backbone, image_variant, list_backbones, register_backbone
from rmn.backbones.weights import WeightsError, load_weights, read_state_dict
from rmn.backbones import efficientnet, resnet, vgg  # noqa: F401  (registers the built-in backbones)

__all__ = [
    "Backbone",
    "BackboneInfo",
    "NamedBackbone",
    "WeightsError",
    "create_backbone",
    "image_variant",
    "list_backbones",
    "load_weights",
    "read_state_dict",
    "register_backbone",
]
