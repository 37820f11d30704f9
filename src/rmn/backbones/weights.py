"""Plain state-dict files (torchvision / timm layout) into a model: strict, with one-line errors.

rmn's backbones keep torchvision's module names, so a torchvision state dict (or a timm ResNet's,
which uses the same names) loads as it is. :func:`read_state_dict` reads ``.pth`` / ``.pt`` / ``.bin``
files with ``torch.load(weights_only=True)`` (nothing is unpickled beyond tensors and plain
containers) and ``.safetensors`` files; a dict wrapping the weights as ``{"state_dict": ...}`` or
``{"model": ...}`` (what training scripts save) is unwrapped. :func:`load_weights` loads it with
``strict=True`` semantics, except that ``skip_classifier=True`` leaves the model's classifier (the
layer its ``classifier_name`` names) as initialised: the way to start from ImageNet weights with a
different number of classes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_WRAPPERS = ("state_dict", "model")
_SHOW = 3  # keys quoted in an error


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model; one line naming the file."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``name -> tensor`` mapping stored in ``path`` (on the CPU)."""
    path = Path(path)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"{path}: not a state-dict file (expected {', '.join(STATE_DICT_SUFFIXES)})")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / safetensors errors come in many types
        raise WeightsError(f"{path}: unreadable as a state dict ({_first_line(e)})") from None
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if not obj:
        raise WeightsError(f"{path}: holds an empty state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]!r} is not a named tensor (not a state dict)")
    return strip_wrapper_prefixes(dict(obj))


# What wrapping a model adds to every name of its state dict: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a prefix that *every* name shares and that only a wrapper adds (``module.``,
    ``_orig_mod.``, in any nesting) removed, so a checkpoint saved from a wrapped model loads into the bare one."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    skip_classifier: bool = False,
    source: str = "state dict",
    skip_option: str = "skip_classifier=True",
) -> None:
    """Load ``state`` into ``model``: every key must match by name and shape (``strict=True``).

    ``skip_classifier`` leaves the classifier (``model.classifier_name``) as it is and ignores the
    file's tensors for it. ``source`` (the file) starts every error message; ``skip_option`` is how
    the caller spells the skip in the hint given when only the number of classes differs.
    """
    skip = ""
    if skip_classifier:
        name = getattr(model, "classifier_name", None)
        if not name:
            raise WeightsError(f"{source}: {type(model).__name__} declares no classifier_name, so its classifier cannot be skipped")
        skip = name + "."
    want = model.state_dict()
    state = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    classifier = getattr(model, "classifier_name", None)
    if shapes and not skip and classifier and all(k.startswith(classifier + ".") for k in shapes):
        k = shapes[0]
        raise WeightsError(
            f"{source}: its classifier has another number of classes ({k} is {tuple(state[k].shape)}, the model's "
            f"{tuple(want[k].shape)}); set {skip_option} to start the classifier afresh")
    if shapes:
        k = shapes[0]
        raise WeightsError(f"{source}: {len(shapes)} tensor(s) of another shape than the model's "
                           f"(first: {k} is {tuple(state[k].shape)}, the model's {tuple(want[k].shape)})")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (skip and k.startswith(skip))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_listed(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_listed(unexpected)})"] if unexpected else [])
        raise WeightsError(f"{source}: does not fit {type(model).__name__}'s layout: keys " + "; ".join(parts))
