"""Image-similarity metrics of synthetic CT against real CT, in Hounsfield units."""

from __future__ import annotations

import torch
from torch import Tensor

#: voxels of the reference CT above this are "body" (air is -1000 HU, fat about -100 HU)
BODY_THRESHOLD_HU = -500.0


def body_mask(ct_hu: Tensor, threshold: float = BODY_THRESHOLD_HU) -> Tensor:
    """Boolean mask of voxels denser than ``threshold`` HU, same shape as ``ct_hu``."""
    return ct_hu > threshold


def mae_hu(pred_hu: Tensor, ref_hu: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error in HU inside ``mask`` (default: the reference's body mask).

    ``pred_hu``, ``ref_hu``: same shape (any); returns a scalar tensor. An empty mask falls back to
    all voxels rather than dividing by zero.
    """
    if mask is None:
        mask = body_mask(ref_hu)
    mask = mask.bool()
    err = (pred_hu - ref_hu).abs()
    if not bool(mask.any()):
        return err.mean()
    return err[mask].mean()
