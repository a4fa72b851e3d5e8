"""Gradient-consistency loss (Hiasa et al. 2018): 1 - mean NCC of the image gradients of a source and its translation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mr2ct.losses._common import check_same_shape

__all__ = ["GradientConsistencyLoss", "central_differences", "gradient_correlation"]


def central_differences(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Central-difference gradients of ``x`` (``(B, C, X, Y, Z)``) on the interior.

    ``d/dx x[i, j, k] = (x[i+1, j, k] - x[i-1, j, k]) / 2`` for interior voxels only
    (no padding, no wrap-around). All three gradients are cropped to the common interior
    grid ``(X-2, Y-2, Z-2)``, so each spatial size must be at least 3.
    """
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < 3:
        raise ValueError(f"central differences need every spatial size >= 3, got {tuple(x.shape[2:])}")
    c = slice(1, -1)
    gx = (x[:, :, 2:, c, c] - x[:, :, :-2, c, c]) * 0.5
    gy = (x[:, :, c, 2:, c] - x[:, :, c, :-2, c]) * 0.5
    gz = (x[:, :, c, c, 2:] - x[:, :, c, c, :-2]) * 0.5
    return gx, gy, gz


def _ncc(a: Tensor, b: Tensor, eps: float) -> Tensor:
    r"""Normalised cross-correlation per (sample, channel) over all spatial voxels.

    ``NCC(a, b) = sum((a - mean a)(b - mean b)) / sqrt(sum (a - mean a)^2 * sum (b - mean b)^2 + eps)``

    Returns shape ``(B, C)``. If either input is constant the numerator is exactly 0, so
    NCC = 0 (and the gradient is finite, because of ``eps`` inside the square root).
    """
    a = a.flatten(2)
    b = b.flatten(2)
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    num = (a * b).sum(dim=-1)
    den = torch.sqrt((a * a).sum(dim=-1) * (b * b).sum(dim=-1) + eps)
    return num / den


def gradient_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Per-sample gradient correlation (Hiasa et al. 2018), shape ``(B,)``.

    ``GC(a, b) = 1/3 * sum_{d in x,y,z} NCC(da/dd, db/dd)``

    with central-difference gradients on the interior (:func:`central_differences`) and the
    NCC taken over the whole volume per sample and per channel (:func:`_ncc`); channels
    are then averaged. ``GC`` is in ``[-1, 1]``: 1 for ``b = s*a + t`` with ``s > 0``,
    -1 for ``s < 0``, ~0 for independent noise.

    Degenerate case: if the gradient of ``a`` or ``b`` along an axis is constant (e.g. a
    constant volume), that axis contributes NCC = 0; a constant volume therefore gives
    ``GC = 0`` (loss ``1 - GC = 1``), never NaN.

    Computed in at least float32.
    """
    check_same_shape(a, b, "a", "b")
    dtype = torch.promote_types(a.dtype, torch.float32)
    ga = central_differences(a.to(dtype))
    gb = central_differences(b.to(dtype))
    ncc = torch.stack([_ncc(x, y, eps) for x, y in zip(ga, gb)], dim=0)  # (3, B, C)
    return ncc.mean(dim=0).mean(dim=1)


class GradientConsistencyLoss(nn.Module):
    r"""Gradient-consistency loss ``1 - GC(source, translated)`` (Hiasa et al. 2018).

    ``GC`` is :func:`gradient_correlation`; the loss is averaged over the batch::

        L = mean_b (1 - GC(source_b, translated_b))

    Range ``[0, 2]``: 0 for identical inputs (or any positive affine intensity change),
    2 for ``translated = -source``, ~1 for unrelated inputs and exactly 1 for a constant
    volume (see :func:`gradient_correlation`). Minimising it *maximises* the correlation
    (the loss is ``1 - GC``, not ``+GC``).
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.weight = float(weight)
        self.eps = float(eps)

    def forward(self, source: Tensor, translated: Tensor) -> Tensor:
        return (1.0 - gradient_correlation(source, translated, eps=self.eps)).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, eps={self.eps}"
