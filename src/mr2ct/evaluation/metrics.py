"""Metrics of synthetic CT against real CT (SynthRAD2023 protocol) and bone Dice (collapse: :mod:`.collapse`).

One implementation serves validation during training, ``python -m mr2ct.evaluate`` and the tests.

SynthRAD2023 (MR->CT) computes, inside a body mask:

- MAE in HU;
- PSNR with both volumes clipped to [-1024, 3000] HU and data range 4024, over the masked voxels;
- SSIM in 3D with both volumes clipped, voxels outside the mask set to -1024, shifted to be
  non-negative, data range 4024; the SSIM map (scikit-image defaults: 7^3 uniform window, sample
  covariance, K1 0.01, K2 0.03) averaged over the masked voxels of its valid (uncropped) region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import compute_dice
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio

from mr2ct.evaluation.segmentation import body_mask as seg_body_mask
from mr2ct.evaluation.segmentation import segment_bone

#: voxels of the reference CT above this are "body" (air is -1000 HU, fat about -100 HU)
BODY_THRESHOLD_HU = -500.0
#: SynthRAD2023's fixed intensity range (HU)
SYNTHRAD_RANGE = (-1024.0, 3000.0)


def body_mask(ct_hu: Tensor, threshold: float = BODY_THRESHOLD_HU) -> Tensor:
    """Boolean mask of voxels denser than ``threshold`` HU, same shape as ``ct_hu``.

    A plain threshold; :func:`mr2ct.evaluation.segmentation.body_mask` adds the largest component and hole filling.
    """
    return ct_hu > threshold


def _mask_or_body(mask: Tensor | None, ref_hu: Tensor) -> Tensor:
    mask = body_mask(ref_hu) if mask is None else mask.bool()
    # an empty mask falls back to all voxels rather than dividing by zero
    return mask if bool(mask.any()) else torch.ones_like(mask)


def mae_hu(pred_hu: Tensor, ref_hu: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error in HU inside ``mask`` (default: the reference's body mask).

    ``pred_hu``, ``ref_hu``: same shape (any); returns a scalar tensor. An empty mask falls back to
    all voxels rather than dividing by zero.
    """
    mask = _mask_or_body(mask, ref_hu)
    return (pred_hu - ref_hu).abs()[mask].mean()


def psnr_hu(pred_hu: Tensor, ref_hu: Tensor, mask: Tensor | None = None, hu_range: Sequence[float] = SYNTHRAD_RANGE) -> Tensor:
    """PSNR in dB over the masked voxels, both volumes clipped to ``hu_range``, data range its width.

    ``10 log10(range^2 / MSE)``; same shapes (any), scalar result.
    """
    lo, hi = float(hu_range[0]), float(hu_range[1])
    mask = _mask_or_body(mask, ref_hu)
    pred, ref = pred_hu.clamp(lo, hi)[mask], ref_hu.clamp(lo, hi)[mask]
    return peak_signal_noise_ratio(pred.double(), ref.double(), data_range=hi - lo).float()


def ssim_map(x: Tensor, y: Tensor, data_range: float, win_size: int = 7, k1: float = 0.01, k2: float = 0.03, sample_covariance: bool = True) -> Tensor:
    """SSIM map of two volumes (X, Y, Z) over the valid region: shape (X-w+1, Y-w+1, Z-w+1).

    A uniform ``win_size``^3 window and, with ``sample_covariance``, the unbiased (N-1) variances:
    scikit-image's ``structural_similarity`` defaults, which SynthRAD2023 uses. torchmetrics and MONAI
    use the biased variances (``sample_covariance=False`` reproduces them; the tests check that).
    """
    if min(x.shape) < win_size:
        raise ValueError(f"SSIM needs every side >= {win_size} voxels, got {tuple(x.shape)}")
    x, y = x.double(), y.double()

    def pool(t: Tensor) -> Tensor:
        # separable box mean by cumulative sums: exact in float64, and avg_pool3d is slow in float64
        for dim in range(3):
            c = torch.cat([torch.zeros_like(t.narrow(dim, 0, 1)), t.cumsum(dim)], dim=dim)
            t = (c.narrow(dim, win_size, c.shape[dim] - win_size) - c.narrow(dim, 0, c.shape[dim] - win_size)) / win_size
        return t

    n = win_size**3
    cov_norm = n / (n - 1) if sample_covariance else 1.0
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.float()


def ssim_hu(pred_hu: Tensor, ref_hu: Tensor, mask: Tensor | None = None, hu_range: Sequence[float] = SYNTHRAD_RANGE, win_size: int = 7) -> Tensor:
    """SynthRAD2023 SSIM of two volumes (X, Y, Z) in HU (see the module docstring); scalar."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    mask = _mask_or_body(mask, ref_hu)
    pred = torch.where(mask, pred_hu.clamp(lo, hi), torch.tensor(lo)) - lo
    ref = torch.where(mask, ref_hu.clamp(lo, hi), torch.tensor(lo)) - lo
    smap = ssim_map(pred, ref, data_range=hi - lo, win_size=win_size)
    pad = win_size // 2
    inner = mask[pad:-pad, pad:-pad, pad:-pad] if pad else mask
    if not bool(inner.any()):
        return smap.mean()
    return smap[inner].mean()


def dice(pred: Tensor, ref: Tensor) -> Tensor:
    """Dice overlap of two boolean masks of the same shape (any); 1.0 when both are empty."""
    p, r = pred.bool().reshape(1, 1, -1).float(), ref.bool().reshape(1, 1, -1).float()
    return compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0]


def sct_metrics(pred_hu: Tensor, ref_hu: Tensor, body: Tensor) -> dict[str, float]:
    """MAE, PSNR, SSIM of a synthetic CT against the real CT inside ``body``; volumes (X, Y, Z) in HU."""
    return {
        "mae": float(mae_hu(pred_hu, ref_hu, body)),
        "psnr": float(psnr_hu(pred_hu, ref_hu, body)),
        "ssim": float(ssim_hu(pred_hu, ref_hu, body)),
    }


def case_metrics(
    pred_hu: Tensor,
    ref_hu: Tensor,
    ref_bone: Tensor | None = None,
    mri: Tensor | None = None,
    segment: dict | None = None,
) -> dict[str, float]:
    """All per-case numbers of one synthetic CT: MAE, PSNR, SSIM, bone Dice (and the MRI baseline).

    Volumes (X, Y, Z): ``pred_hu``, ``ref_hu`` in HU; ``ref_bone`` the reference bone mask (default: the
    same segmentation of the real CT); ``mri`` (any units) for the baseline "the same thresholding
    applied to the MRI" (``dice_mri``), its body found with ``air_threshold=auto``. The body mask is
    :func:`mr2ct.evaluation.segmentation.body_mask` of the real CT; ``segment``: keyword arguments of
    :func:`mr2ct.evaluation.segmentation.segment_bone`.
    """
    params = dict(segment or {})
    pred, ref = pred_hu.detach().float().cpu(), ref_hu.detach().float().cpu()
    body = torch.from_numpy(seg_body_mask(ref.numpy(), params.get("air_threshold", BODY_THRESHOLD_HU)))
    out = sct_metrics(pred, ref, body)
    bone_ref = ref_bone.detach().cpu().bool() if ref_bone is not None else torch.from_numpy(segment_bone(ref.numpy(), **params))
    out["dice"] = float(dice(torch.from_numpy(segment_bone(pred.numpy(), **params)), bone_ref))
    if mri is not None:
        mri_params = {**params, "air_threshold": "auto"}
        out["dice_mri"] = float(dice(torch.from_numpy(segment_bone(mri.detach().float().cpu().numpy(), **mri_params)), bone_ref))
    return out
