"""How a model's arithmetic runs: autocast dtype, memory format, gradient scaling.

``Precision`` is what ``run.amp`` and ``run.channels_last`` (``--amp``, ``--channels-last``) turn
into; the recipe applies it to training, evaluation and every feature pass (step 3, BatchNorm
matching, the atlas), so a model never sees one precision in training and another in its features.

* ``amp: bf16`` autocasts convolutions and linear layers to bfloat16 (CPUs with bf16 units and
  GPUs); ``fp16`` to float16 with a gradient scaler (its state is saved in checkpoints, so resume
  stays exact). ``none`` is float32.
* ``channels_last`` stores 4-d weights and activations as NHWC, the layout fast convolution kernels
  want; routed dispatch keeps it (:mod:`rmn.dispatch`).

Routing never runs in reduced precision: nearest-memory search and k-means are :func:`float32_only`,
and memory statistics are float64 sums of float32 features.

``run.compile`` (``--compile``) compiles the parts of a network that run on whole tensors (stem,
head, every procedure) with ``torch.compile``, leaving the routing between them eager: slice sizes
change every step, which a compiled graph would have to guard on. It is meant for GPUs: on the
project's CPU it was slower than eager in every case timed (BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# oneDNN (torch's CPU convolutions) caches one compiled kernel per layer shape *and batch size*. A
# routed stage hands its procedures slices whose sizes change every step, so an RMN needs many
# more entries than the 1,024 oneDNN keeps by default; past that, kernels are evicted and compiled
# again, which made an RMN training step up to 1.5x slower (BENCHMARKS.md). oneDNN reads this once,
# before its first convolution, so it is set when rmn is imported; a value the user set wins.
ONEDNN_CACHE_CAPACITY = "16384"
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def float32_only(fn):
    """Decorate a function of tensors so it never runs under autocast (device of its first tensor arg)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if torch.is_tensor(a)), None)
        device_type = t.device.type if t is not None else "cpu"
        if not torch.is_autocast_enabled(device_type):  # the common case, on the batch-1 path: no context
            return fn(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Precision:
    amp: str = "none"
    channels_last: bool = False
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")

    @property
    def dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (a null context for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in this precision's memory format (autocast casts it where needed)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def model(self, model: nn.Module) -> nn.Module:
        """Put ``model``'s 4-d parameters and buffers in this precision's memory format (in place)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def check_training(self, threads: int) -> None:
        """Refuse what crashes: on CPU, torch's backward of a 1x1 stride-2 convolution (ResNet's
        downsampling shortcut) in channels_last with more than one thread corrupts the heap for batches
        below 16 (torch 2.13; seen as 'double free or corruption' or a segfault). Routed slices are
        that small, so an RMN hits it within steps (BENCHMARKS.md has the reproducer)."""
        if self.channels_last and self.device_type == "cpu" and threads > 1:
            raise ValueError(
                f"run.channels_last on CPU with {threads} threads: torch's channels_last convolution backward "
                "corrupts memory there on small routed slices; set run.threads 1 (--run.threads 1) or drop --channels-last")

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler: active for fp16 only (bf16 has float32's exponent range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.amp == "fp16")


FLOAT32 = Precision()


# Distinct compiled variants per code object: every stage width, with and without downsampling,
# static and dynamic batch. torch's default (8) is below what one ResNet needs.
RECOMPILE_LIMIT = 64


def compile_parts(model: nn.Module) -> nn.Module:
    """Compile every procedure of ``model``'s routed stages, and every module outside them, in place
    (parameter names do not change); the routing and attention stay eager, a graph break by construction.

    Accepts any routed model (:func:`rmn.route`). Call :func:`uncompile` before
    deep-copying a compiled model (cloning does)."""
    import torch._dynamo

    from .stage import RoutedStage

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    def parts(module: nn.Module):
        for child in module.children():
            if isinstance(child, RoutedStage):
                yield from child.procedures
            elif any(isinstance(m, RoutedStage) for m in child.modules()):
                yield from parts(child)
            elif any(True for _ in child.parameters()):  # parameter-free modules (ReLU, pooling) stay eager
                yield child

    for part in list(parts(model)):
        part.compile(dynamic=True)
    return model


def uncompile(model: nn.Module) -> nn.Module:
    """Drop what :func:`compile_parts` did: a compiled call wraps *its* module, so a deep copy of a
    compiled module would still run the original's weights."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return model
