"""ImageNet-C-style corruptions (Hendrycks & Dietterich, ICLR 2019) for small images.

Implemented here in torch (no corruption library: ``imagecorruptions``, last released in 2020,
needs OpenCV and scikit-image and is written for ImageNet-sized RGB arrays), following the
formulas of the CIFAR-10-C generator (``make_cifar_c.py``), whose constants are the ones for
32x32 images and are used unchanged for 28x28 (Fashion-)MNIST. Severities 1-5, on images in [0, 1]:

- gaussian_noise: ``x + N(0, c^2)``, c = (0.04, 0.06, 0.08, 0.09, 0.10)
- impulse_noise: salt-and-pepper, each value set to 0 or 1 (equally likely) with probability
  c = (0.01, 0.02, 0.03, 0.05, 0.07)
- defocus_blur: a disk of radius r convolved with a 3x3 Gaussian of std s ((r, s) = (0.3, 0.4),
  (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), reflect-padded, per channel
- gaussian_blur: Gaussian of std c = (0.4, 0.6, 0.7, 0.8, 1.0), truncated at 4 std,
  edge-padded, per channel
- contrast: ``(x - m) * c + m`` with m the per-image channel mean, c = (0.75, 0.5, 0.4, 0.3,
  0.15)

then clipped to [0, 1]. uint8 input is read as ``x / 255`` and written back rounded; float
input is taken to be in [0, 1] and stays float. Noise is drawn from a generator seeded by
``(seed, name, severity)``, so a corruption is deterministic.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]

SEVERITIES = (1, 2, 3, 4, 5)
_GAUSS = (0.04, 0.06, 0.08, 0.09, 0.10)
_IMPULSE = (0.01, 0.02, 0.03, 0.05, 0.07)
_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)


def _gaussian_1d(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Per-channel 2-D filter of ``x [N, C, H, W]`` with ``kernel [k, k]`` (k odd)."""
    n, c, h, w = x.shape
    r = kernel.shape[-1] // 2
    xp = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode=mode)
    return F.conv2d(xp, kernel.to(x.dtype)[None, None]).reshape(n, c, h, w)


def _defocus_kernel(radius: float, alias_sigma: float) -> Tensor:
    half = max(math.ceil(radius), 1) + 1
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk = disk / disk.sum()
    g = _gaussian_1d(alias_sigma, 1)
    g2 = torch.outer(g, g)
    out = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), g2[None, None])[0, 0]
    return out / out.sum()


def _gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    return x + _GAUSS[s - 1] * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _impulse_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    hit = torch.rand(x.shape, generator=g, dtype=x.dtype) < _IMPULSE[s - 1]
    salt = torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _defocus_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    k = _defocus_kernel(*_DEFOCUS[s - 1])
    r = k.shape[-1] // 2
    return _filter(x, k, "reflect" if min(x.shape[-2:]) > r else "replicate")


def _gaussian_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    sigma = _BLUR[s - 1]
    g1 = _gaussian_1d(sigma, math.ceil(4 * sigma))
    return _filter(x, torch.outer(g1, g1), "replicate")


def _contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    m = x.mean(dim=(-2, -1), keepdim=True)
    return (x - m) * _CONTRAST[s - 1] + m


#: name -> function(x float64 [N, C, H, W] in [0, 1], severity, generator) -> unclipped image.
CORRUPTIONS = {
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
}


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``x [N, C, H, W]`` (uint8, or float in [0, 1]) corrupted by ``name`` at ``severity``
    (1-5): same shape and dtype, values in [0, 255] / [0, 1]. Deterministic in the seed."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} is invalid: choose one of {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r} is invalid: choose one of {SEVERITIES}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"images shape={tuple(getattr(x, 'shape', ()))} is invalid: "
                         "need [N, C, H, W]")
    if x.dtype == torch.uint8:
        xf = x.double() / 255.0
    elif torch.is_floating_point(x):
        xf = x.double()
    else:
        raise ValueError(f"images dtype={x.dtype} is invalid: need uint8 or float")
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{severity}".encode()))
    y = CORRUPTIONS[name](xf, severity, g).clamp(0.0, 1.0)
    if x.dtype == torch.uint8:
        return (y * 255.0).round().to(torch.uint8)
    return y.to(x.dtype)
