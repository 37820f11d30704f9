"""What a routable CNN declares, and the three-phase layout ``stem`` -> ``stages`` -> ``head``.

The paper sees a CNN as a stem ``P0`` (shared), feature-processing stages ``P1..PS`` split at the
down-sampling operations (routed), and a classifier (shared).

* :class:`NamedBackbone` is the base of rmn's own CNNs: they keep the reference implementation's
  module names (torchvision's), so its state dicts load with ``strict=True``, and name their routed
  stages in ``stage_names``.
* :class:`Backbone` is a plain container for a user's CNN given as the three phases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneInfo:
    """What was asked for, so a checkpoint can rebuild the same backbone."""

    name: str
    num_classes: int
    image_size: int
    in_channels: int
    width_mult: float


class Backbone(nn.Module):
    """A plain CNN as ``head(stages[S-1](...stages[0](stem(x))))``.

    ``stage_channels[i]`` is the channel count of the *input* of ``stages[i]`` (what its memories
    live in) and ``out_channels[i]`` that of its output (what Conditional Attention re-weights).
    ``min_image_size`` is the smallest input side the architecture accepts.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Module],
        head: nn.Module,
        stage_channels: list[int],
        out_channels: list[int],
        in_channels: int,
        min_image_size: int = 1,
        info: BackboneInfo | None = None,
    ) -> None:
        super().__init__()
        if not (len(stages) == len(stage_channels) == len(out_channels)):
            raise ValueError("stages, stage_channels and out_channels must have the same length")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_channels = list(stage_channels)
        self.out_channels = list(out_channels)
        self.in_channels = in_channels
        self.min_image_size = min_image_size
        self.info = info

    @property
    def stage_names(self) -> list[str]:
        """The stages as :func:`rmn.route` names them: ``stages.0``, ``stages.1``, ..."""
        return [f"stages.{i}" for i in range(len(self.stages))]

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the architecture cannot take, with a message that says why."""
        check_image_input(x, self.in_channels, self.min_image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


class NamedBackbone(nn.Module):
    """A CNN in its reference implementation's module layout that names its routed stages.

    Subclasses build their modules under torchvision's names, run torchvision's ``forward``, and
    declare (through :meth:`_declare`):

    * ``stage_names``: each routed stage as one submodule's dotted name (``"layer1"``) or a list of
      names run in sequence (``["features.4", "features.5"]``), in forward order;
    * ``stage_channels[i]`` / ``out_channels[i]``: channels of the input / output of stage ``i``;
    * ``in_channels``, ``min_image_size`` (smallest input side accepted) and ``info``;
    * ``classifier_name``: the layer that produces the logits (its shape depends on ``num_classes``).

    :func:`rmn.route` finds the stages by these names and replaces them in place; the model's own
    ``forward`` runs unchanged.
    """

    stage_names: list[str | list[str]]
    classifier_name: str

    def _declare(
        self,
        stage_names: list[str | list[str]],
        stage_channels: list[int],
        out_channels: list[int],
        in_channels: int,
        min_image_size: int,
        classifier_name: str,
        info: BackboneInfo | None = None,
    ) -> None:
        if not (len(stage_names) == len(stage_channels) == len(out_channels)):
            raise ValueError("stage_names, stage_channels and out_channels must have the same length")
        self.stage_names = [n if isinstance(n, str) else list(n) for n in stage_names]
        self.stage_channels = list(stage_channels)
        self.out_channels = list(out_channels)
        self.in_channels = in_channels
        self.min_image_size = min_image_size
        self.classifier_name = classifier_name
        self.info = info

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the architecture cannot take, with a message that says why."""
        check_image_input(x, self.in_channels, self.min_image_size)

    def stem_modules(self) -> list[nn.Module]:
        """The paper's stem P0, what runs before the first stage, in order (rmn 0.1 saved them as ``stem.0``,
        ``stem.1``, ...: its checkpoints are read through this list)."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """The classifier, what runs after the last stage, in order (rmn 0.1's ``head.0``, ...); a module made
        on the fly (``nn.Flatten``) stands for the flatten of the forward."""
        raise NotImplementedError


class FeaturesBackbone(NamedBackbone):
    """torchvision's ``features`` -> ``avgpool`` -> flatten -> ``classifier`` layout (VGG, EfficientNet)."""

    features: nn.Sequential
    avgpool: nn.Module
    classifier: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def check_image_input(x: torch.Tensor, in_channels: int, min_image_size: int) -> None:
    """One-line errors for the usual mistakes: wrong rank, wrong channels, too small an image."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"input has {x.shape[1]} channels but the model was built for in_channels={in_channels}"
        )
    if min(x.shape[2], x.shape[3]) < min_image_size:
        raise ValueError(
            f"input of {x.shape[2]}x{x.shape[3]} pixels is too small for this backbone "
            f"(needs at least {min_image_size}x{min_image_size})"
        )


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (CPU for an empty module)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
