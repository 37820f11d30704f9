"""Name -> builder registry for the backbones, plus the shared option checks.

``create_backbone("resnet18", num_classes=200, image_size=64)`` builds the registered model.
A builder is any callable returning an ``nn.Module`` (timm's ``@register_model`` style): it gets
each of ``num_classes``, ``image_size``, ``in_channels`` and ``width_mult`` that it names in its
signature (all four when it takes ``**kwargs``), plus the caller's backbone-specific options.

Image-size variants (:func:`image_variant`): the paper trains at three input sizes and changes the
architecture with them. A requested ``image_size`` is mapped onto the nearest of 32, 64 and 224:

==============  ============  ============================================================
image_size      variant       meaning
==============  ============  ============================================================
1 .. 48         ``"cifar"``   CIFAR-100 (32x32)
49 .. 143       ``"tiny"``    Tiny ImageNet (64x64)
144 and above   ``"imagenet"`` ImageNet (224x224): the standard, torchvision-identical models
==============  ============  ============================================================

(The 48 / 144 boundaries are the midpoints; 48 goes to ``"cifar"`` and 144 to ``"imagenet"``.)
ResNet and EfficientNet use one small-image variant for both ``"cifar"`` and ``"tiny"`` (their
first two down-samplings removed); VGG distinguishes all three.
"""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Any, Callable

from torch import nn

from rmn.backbones.base import BackboneInfo

BackboneBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, BackboneBuilder] = {}

# Modules whose import registers the built-in backbones (imported lazily to avoid import cycles).
_BUILTIN_MODULES = ("rmn.backbones.resnet", "rmn.backbones.vgg", "rmn.backbones.efficientnet")

_CIFAR_MAX = 48
_TINY_MAX = 143


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: register ``builder(**options) -> nn.Module`` under ``name`` (case-insensitive)."""
    if not isinstance(name, str) or not name:
        raise ValueError("backbone name must be a non-empty string")
    key = name.lower()

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not builder:
            same_origin = (
                getattr(existing, "__module__", None) == getattr(builder, "__module__", None)
                and getattr(existing, "__qualname__", None) == getattr(builder, "__qualname__", None)
            )
            if not same_origin:  # a module reload re-registers the same function: allowed
                raise ValueError(f"a backbone named '{key}' is already registered")
        _REGISTRY[key] = builder
        return builder

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def image_variant(image_size: int) -> str:
    """Map an input side to the architecture variant: ``"cifar"`` | ``"tiny"`` | ``"imagenet"``.

    Nearest of 32 / 64 / 224: ``<= 48`` -> ``"cifar"``, ``49..143`` -> ``"tiny"``,
    ``>= 144`` -> ``"imagenet"``.
    """
    image_size = _check_int("image_size", image_size, 1)
    if image_size <= _CIFAR_MAX:
        return "cifar"
    if image_size <= _TINY_MAX:
        return "tiny"
    return "imagenet"


def _check_int(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{option} must be >= {minimum}, got {value}")
    return int(value)


def check_options(num_classes: Any, image_size: Any, in_channels: Any, width_mult: Any) -> tuple[int, int, int, float]:
    """Validate the common builder options; return them normalised (plain ``int``/``float``)."""
    num_classes = _check_int("num_classes", num_classes, 1)
    image_size = _check_int("image_size", image_size, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real):
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    width_mult = float(width_mult)
    if not math.isfinite(width_mult) or width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return num_classes, image_size, in_channels, width_mult


def check_min_image_size(name: str, image_size: int, variant: str, min_image_size: int) -> None:
    """Refuse to build a variant for an ``image_size`` it cannot process."""
    if image_size < min_image_size:
        raise ValueError(
            f"image_size={image_size} is too small for {name} (its '{variant}' variant needs "
            f"inputs of at least {min_image_size}x{min_image_size})"
        )


def make_info(name: str, num_classes: int, image_size: int, in_channels: int, width_mult: float) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        num_classes=num_classes,
        image_size=image_size,
        in_channels=in_channels,
        width_mult=width_mult,
    )


def create_backbone(
    name: str,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered backbone ``name`` (see :func:`list_backbones`) and set its ``info``.

    ``kwargs`` are backbone-specific options (e.g. ``zero_init_residual`` for ResNet,
    ``dropout`` for VGG / EfficientNet, ``drop_path_rate`` for EfficientNet). The common options
    are checked here and passed to the builder where its signature takes them.
    """
    _load_builtins()
    key = name.lower() if isinstance(name, str) else None
    builder = _REGISTRY.get(key)
    if builder is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    num_classes, image_size, in_channels, width_mult = check_options(
        num_classes, image_size, in_channels, width_mult
    )
    common = {"num_classes": num_classes, "image_size": image_size, "in_channels": in_channels, "width_mult": width_mult}
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        allowed = sorted(n for n in params if n not in common)
        for option in kwargs:
            if option not in params or option in common:
                raise ValueError(
                    f"unknown option {option!r} for backbone '{key}'; valid options: "
                    f"{', '.join(allowed) if allowed else '(none)'}"
                )
    passed = {k: v for k, v in common.items() if takes_any or k in params}
    model = builder(**passed, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"builder for '{key}' returned {type(model).__name__}, not an nn.Module")
    model.info = make_info(key, num_classes, image_size, in_channels, width_mult)
    return model
