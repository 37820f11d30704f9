"""Optional dependencies, imported where they are used and named by the pip extra that installs them.

The core install (torch, numpy, pyyaml, safetensors, tqdm) builds, routes, trains and evaluates models on
tensors and the CIFAR / (Fashion-)MNIST releases. Everything else is an extra of ``pyproject.toml``::

    plots        matplotlib, Pillow   the memory atlas (rmn atlas, run.atlas)
    tensorboard  tensorboard          TensorBoard logs (run.tensorboard)
    digits       scikit-learn         the embedded digits dataset (the demo's)
    images       Pillow               image-file datasets: folder, Tiny ImageNet, ImageNet
    fused        ninja                rmn.fuse_for_inference's C++ batch-1 ops (with a C++ compiler)
    all          all of the above

>>> plt = require("matplotlib.pyplot", extra="plots", feature="the memory atlas")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from types import ModuleType

# import name (top level) -> the name pip installs it under
PIP_NAMES = {"PIL": "pillow", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tensorboard": "tensorboard"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is one line naming the extra to install."""


def require(module: str, extra: str, feature: str, instead: str | None = None) -> ModuleType:
    """``module`` imported, or :class:`MissingExtra` saying that ``feature`` needs it and which extra
    installs it (``instead``: what else the user can do, e.g. switch the feature off)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = PIP_NAMES.get(top, top)
        message = f"{feature} needs {package}: pip install 'rmn[{extra}]'"
        if instead:
            message += f" ({instead})"
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top
        if not missing:  # installed but broken: say so instead of asking for an install that is there
            message += f"; {module} is installed but failed to import: {' '.join(str(e).split())}"
        raise MissingExtra(message) from e
