"""MIND structure loss: the modality independent neighbourhood descriptor of a volume and of its translation.

MIND (Heinrich et al., Medical Image Analysis 2012) describes each voxel by how similar its surrounding
patch is to patches around nearby positions; the self-similarity-context variant MIND-SSC (Heinrich et
al., MICCAI 2013) compares the 12 pairs of six-neighbourhood positions that are sqrt(2) * dilation
apart instead of centre-to-neighbour pairs. The descriptor depends on local structure only, not on the
modality's intensities, so ``|MIND(mri) - MIND(G(mri))|`` ties the translation's anatomy to the input's
while leaving the generator free to change contrast (structure-constrained CycleGAN, Yang et al. 2018).
"""

from __future__ import annotations

import contextlib
import functools
import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mr2ct.losses._common import check_same_shape, masked_mean

__all__ = ["MINDLoss", "mind_ssc", "SSC_PAIRS"]

_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: the 12 pairs of six-neighbourhood offsets that are sqrt(2) apart (opposite neighbours excluded)
SSC_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = tuple(
    (p, q) for p, q in combinations(_SIX, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2
)


def _shift(padded: Tensor, offset: tuple[int, int, int], pad: int, shape: tuple[int, int, int]) -> Tensor:
    """``x[i + offset]`` for every voxel i of the original grid, read from ``x`` padded by ``pad`` on each side."""
    (ox, oy, oz), (X, Y, Z) = offset, shape
    return padded[:, :, pad + ox : pad + ox + X, pad + oy : pad + oy + Y, pad + oz : pad + oz + Z]


@functools.lru_cache(maxsize=32)
def _blur_matrix(length: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(length, length) M with ``(x @ M)[i] = sum_k g_k x[clamp(i + k)]``: the truncated Gaussian g
    (2 sigma, normalised) along one axis, the replicate border folded into the first and last rows."""
    radius = max(1, math.ceil(2.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    out = torch.arange(length)
    m = torch.zeros(length, length, dtype=torch.float64)
    for k in range(-radius, radius + 1):
        m.index_put_(((out + k).clamp(0, length - 1), out), g[k + radius].expand(length), accumulate=True)
    return m.to(device, dtype)  # cached per dtype and device: no copy in the training step


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter (truncated at 2 sigma, replicate borders) of every channel of (N, C, X, Y, Z).

    Each axis is a product with a banded matrix rather than a depthwise convolution: CPU kernels for
    grouped 3D convolutions and their gradients are slow (the descriptor's blur took most of the MIND
    term's time), while three small matrix products run at the matmul rate.
    """
    n, c, nx, ny, nz = x.shape
    mx, my, mz = (_blur_matrix(int(k), float(sigma), x.dtype, x.device) for k in (nx, ny, nz))
    x = x @ mz  # along Z; the others as left products on views, so nothing is permuted and copied
    x = my.T @ x.reshape(n * c * nx, ny, nz)
    return (mx.T @ x.reshape(n * c, nx, ny * nz)).reshape(n, c, nx, ny, nz)


def mind_ssc(x: Tensor, sigma: float = 2.0, dilation: int = 1, eps: float = 1e-6) -> Tensor:
    """MIND-SSC descriptor, (B, C, X, Y, Z) -> (B, 12 C, X, Y, Z), values in (0, 1], max 1 per voxel and channel.

    For each of the 12 neighbour pairs (p, q) of :data:`SSC_PAIRS` (offsets times ``dilation``):
    ``D = G_sigma * (x(. + p) - x(. + q))^2``, a Gaussian-weighted patch distance; the local variance
    estimate V is the mean of the 12 distances, clamped to [1e-3, 1e3] times its volume mean (as the
    reference code does, so flat regions do not amplify noise); the descriptor is ``exp(-D / V)``
    divided by its maximum over the 12 pairs. Invariant to ``x -> s x + t`` (s != 0).

    Args:
        x: volume(s) of shape (B, C, X, Y, Z), any intensity scale.
        sigma: Gaussian patch width in voxels.
        dilation: distance of the six neighbours from the centre, in voxels.
        eps: floor of the variance, so a constant volume gives a flat descriptor instead of NaN.
    """
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
    b, c, *spatial = x.shape
    d = int(dilation)
    if d < 1 or min(spatial) <= d:
        raise ValueError(f"dilation must be >= 1 and smaller than every spatial size {tuple(spatial)}, got {dilation}")
    # the same descriptor whatever the training precision (the planner's meta device has no autocast to leave)
    fp32 = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext()
    with fp32:
        return _mind_ssc_fp32(x.reshape(b * c, 1, *spatial).float(), sigma, d, eps).reshape(b, c * len(SSC_PAIRS), *spatial)


def _mind_ssc_fp32(x: Tensor, sigma: float, d: int, eps: float) -> Tensor:
    """:func:`mind_ssc` of (N, 1, X, Y, Z) float32 -> (N, 12, X, Y, Z)."""
    padded = F.pad(x, [d] * 6, mode="replicate")
    shape = tuple(x.shape[2:])
    diffs = [
        (_shift(padded, tuple(d * o for o in p), d, shape) - _shift(padded, tuple(d * o for o in q), d, shape)) ** 2
        for p, q in SSC_PAIRS
    ]
    dist = _gaussian_blur(torch.cat(diffs, dim=1), sigma)  # (BC, 12, X, Y, Z)
    dist = dist - dist.amin(dim=1, keepdim=True)  # = dividing exp(-D/V) by its maximum over the pairs
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, mean_var * 1e3), mean_var * 1e-3).clamp_min(eps)
    return torch.exp(-dist / var)


class MINDLoss(nn.Module):
    r"""Structure loss ``mean |MIND(source) - MIND(translated)|`` over voxels (in ``mask`` if given) and channels.

    Zero when the translation is any linear intensity remap of the source, large when its anatomy moved.
    Applied MRI vs synthetic CT and CT vs synthetic MRI.

    Args:
        weight: weight of the term in the generator loss.
        sigma: Gaussian patch width of the descriptor, voxels.
        dilation: neighbour distance of the descriptor, voxels.

    Shapes: ``source``, ``translated`` (B, C, X, Y, Z); ``mask`` (B, 1, X, Y, Z) or None; returns a scalar.
    """

    def __init__(self, weight: float = 5.0, sigma: float = 2.0, dilation: int = 1) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"MIND sigma must be > 0, got {sigma}")
        self.weight, self.sigma, self.dilation = float(weight), float(sigma), int(dilation)

    def forward(self, source: Tensor, translated: Tensor, mask: Tensor | None = None) -> Tensor:
        check_same_shape(source, translated, "source", "translated")
        with torch.no_grad():
            target = mind_ssc(source, self.sigma, self.dilation)
        return masked_mean((mind_ssc(translated, self.sigma, self.dilation) - target).abs(), mask)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, sigma={self.sigma}, dilation={self.dilation}"
