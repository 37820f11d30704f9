"""Fused batch-1 inference on CPU: each routed stage's route and Conditional Attention as one C++ call each.

    rmn.fuse_for_inference(model)      # builds csrc/stage_ops.cpp on first use (about 25 s; cached by torch)
    with torch.inference_mode():
        model(image)                   # batch 1: 2 C++ calls per stage instead of about twenty small torch ops

Why: at batch 1 a routed stage's small ops (GAP, distances, argmin, the SE block) cost 5-10x more between
convolutions than alone, and put RMN with CA at about 1.05x its backbone's latency; fused, they cost a fifth of
that (BENCHMARKS.md). Off by default: the fused sums round differently from torch's, so outputs are close to the
reference path (1e-5), not bit-equal, and a route can differ where two memories are equally near.

The fused path runs only where it applies: eval mode, no autograd, CPU float32 contiguous batches of one sample, no
autocast. Everything else (training, batches, bf16, channels_last, CUDA) takes the reference path unchanged.
Building needs ``pip install 'rmn[fused]'`` (ninja) and a C++ compiler with Python's headers; without them
:func:`fuse_for_inference` says so in one line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from .extras import require

SOURCE = Path(__file__).resolve().parent / "csrc" / "stage_ops.cpp"
_built: dict = {}


def load():
    """The compiled ops module, or None if it cannot be built here (:func:`build_error` says why)."""
    if "ext" not in _built and "error" not in _built:
        try:
            require("ninja", extra="fused", feature="rmn.fuse_for_inference")  # torch's extension builder runs it
            from torch.utils.cpp_extension import load as build
            os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
            _built["ext"] = build("rmn_stage_ops", [str(SOURCE)], extra_cflags=["-O3", "-fopenmp-simd"])
        except Exception as e:  # no ninja, no compiler, no headers: the reference path stays
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _built["error"] = f"{type(e).__name__}: {first}"[:300]
    return _built.get("ext")


def build_error() -> str | None:
    """Why :func:`load` gave None (None if it was not tried or succeeded)."""
    return _built.get("error")


def fuse_for_inference(model: nn.Module, on: bool = True) -> nn.Module:
    """Let every routed stage of ``model`` run its batch-1 inference through the fused ops (``on=False``: back to
    the reference ops). Returns ``model``. Raises RuntimeError in one line if the ops cannot be built here."""
    from .route import routed_stages

    if on:
        ops()
    for stage in routed_stages(model):
        stage.fused = bool(on)  # a flag, not the module: the model still deep-copies and pickles
    return model


def ops():
    """The compiled ops (built on first use, also in a process that unpickled a fused model), or RuntimeError in one
    line saying why they cannot be built here."""
    ext = load()  # cached after the first call
    if ext is None:
        raise RuntimeError(f"rmn's fused inference ops could not be built here ({build_error()}); "
                           "they need `pip install 'rmn[fused]'` (ninja) and a C++ compiler with Python's headers")
    return ext


def applies(x: torch.Tensor, training: bool) -> bool:
    """Whether a stage input takes the fused path: one CPU float32 NCHW-contiguous sample, eval, no autograd."""
    return (x.shape[0] == 1 and not training and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and x.is_contiguous() and not torch.is_autocast_enabled("cpu"))
