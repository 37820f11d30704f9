"""The paper's augmentations, as whole-batch tensor ops (in-memory data) and per-image Pillow ops (files;
Pillow is imported by those functions only, so in-memory data needs no Pillow).

Randomness is always passed in (offsets, flips, a numpy Generator) rather than drawn here, so the
loader can make it a pure function of (seed, epoch, sample index) and tests can replay it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .folder import pil_image, pil_to_uint8


def pad_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int
                  ) -> torch.Tensor:
    """Zero-pad a batch by ``padding``, crop back to size at offsets ``(dy, dx)``, mirror where ``flip``.

    ``x`` is ``[B, C, H, W]`` (any dtype, any device); ``dy``/``dx`` are int64 ``[B]`` in ``0..2*padding``
    and ``flip`` is bool ``[B]``. One ``gather`` does crop and flip for the whole batch.
    """
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    wp = w + 2 * padding
    dev = x.device
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + dx[:, None]          # [B, W]
    rows = torch.arange(h, device=dev)[None, :] + dy[:, None]                        # [B, H]
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, -1), 2, index).reshape(b, c, h, w)


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place: float ``x`` with values in 0..255 -> ``(x/255 - mean) / std``; mean/std are ``[C]``."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return x.mul_(scale).sub_(shift)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size x size`` (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box ``(left, top, right, bottom)``: area fraction in ``scale``, aspect in ``ratio``.

    Same sampling rule as the reference implementation (10 tries, then a centred crop with the
    aspect clamped into ``ratio``).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, flip: bool = True) -> torch.Tensor:
    """ImageNet training transform: random-resized-crop to ``size`` (+ flip with p=0.5) -> uint8 [3,S,S]."""
    Image = pil_image()
    box = random_resized_crop_box(img.width, img.height, rng)
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_uint8(out)


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """ImageNet evaluation transform: shorter side to ``round(size*256/224)``, centre crop ``size``."""
    Image = pil_image()
    short = int(round(size * 256 / 224))
    w, h = img.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return pil_to_uint8(img.crop((left, top, left + size, top + size)))


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """The image at ``size x size`` (Tiny ImageNet files already are 64x64; others are resized)."""
    Image = pil_image()
    return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)


def pad_crop_flip_pil(img: Image.Image, padding: int, flip: bool, rng: np.random.Generator) -> Image.Image:
    """:func:`pad_crop_flip` for one Pillow image, offsets drawn from ``rng``.

    Pillow's ``crop`` fills the area outside the image with zeros, which is exactly zero padding.
    """
    Image = pil_image()
    dy, dx = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    out = img.crop((dx - padding, dy - padding, dx - padding + img.width, dy - padding + img.height))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out
