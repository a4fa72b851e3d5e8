"""Helpers shared by the loss modules: shape checks and reductions restricted to a mask."""

from __future__ import annotations

from torch import Tensor


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` (B, C, X, Y, Z) over the voxels where ``mask`` (B, 1, X, Y, Z) is set; plain mean without one.

    A sample whose mask is empty contributes nothing (the result is 0 when every mask is empty), so a patch
    of pure air never divides by zero.
    """
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1.0)
