"""Bone segmentation by thresholding inside the body (the library behind ``python -m mr2ct.segment``).

Pipeline (on a CT or synthetic CT in HU, or on any image with ``air_threshold=auto``):

1. body mask: voxels above ``air_threshold``, the largest connected component, holes filled in every
   axial (X, Y) slice and then in 3D (lungs and bowel gas end up *inside* the body);
2. a threshold computed from the intensities inside the body: ``otsu`` (two classes) or ``multiotsu``
   (the lower bound of the brightest of ``classes`` classes);
3. bone = body voxels above the threshold, components smaller than ``min_size`` voxels removed.

Why ``multiotsu`` with 4 classes is the default: inside a body that holds lungs or bowel gas, two-class
Otsu splits air from tissue (threshold near -400 HU) and labels all soft tissue as bone; the brightest
of 4 multi-Otsu classes isolates bone (figures: README, "Translate, segment, evaluate"). Plain Otsu is
enough when the body holds no gas and bone is a large share of it (e.g. a cropped spine or limb); see
:func:`bone_threshold`.

Otsu and multi-Otsu are implemented on a histogram here (no scikit-image dependency): multi-Otsu by
exact dynamic programming over bin boundaries, which maximises the between-class variance as
``skimage.filters.threshold_multiotsu`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage



METHODS = ("otsu", "multiotsu")
#: air threshold for (synthetic) CT in HU: air is -1000, fat about -100
AIR_THRESHOLD_HU = -500.0


def _histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, bin centres and bin edges of ``values`` (1-D)."""
    counts, edges = np.histogram(values, bins=bins)
    return counts.astype(np.float64), (edges[:-1] + edges[1:]) / 2.0, edges


def multiotsu_thresholds(values: np.ndarray, classes: int = 3, bins: int = 256) -> list[float]:
    """The ``classes - 1`` thresholds that maximise the between-class variance of ``values``.

    Exact over the histogram's bin boundaries, by dynamic programming: with the class cost
    ``S(i, j)^2 / W(i, j)`` (S = sum of intensities, W = voxel count of bins i..j-1), maximising the
    sum of costs over a partition into ``classes`` runs of bins is the same as maximising the
    between-class variance. A threshold is the upper edge of the last bin of the lower class, so
    ``> t`` splits the voxels exactly as the histogram was split (scikit-image returns that bin's
    centre, up to half a bin lower). ``classes=2`` is Otsu's method.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot threshold an empty set of voxels")
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return [lo] * (classes - 1)
    counts, centres, edges = _histogram(values, bins)
    w = np.concatenate([[0.0], np.cumsum(counts)])
    s = np.concatenate([[0.0], np.cumsum(counts * centres)])
    n = len(counts)

    def cost(i: np.ndarray | int, j: np.ndarray | int) -> np.ndarray:
        # class = bins i..j-1; empty classes contribute nothing
        ww = w[j] - w[i]
        ss = s[j] - s[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ww > 0, ss * ss / np.where(ww > 0, ww, 1.0), 0.0)

    # best[k][j]: best cost of splitting bins 0..j-1 into k+1 classes; arg[k][j]: start of the last class
    idx = np.arange(n + 1)
    best = cost(0, idx)
    args = []
    for _ in range(1, classes):
        i = idx[:, None]  # start of the last class
        j = idx[None, :]  # end (exclusive)
        total = np.where(i < j, best[:, None] + cost(i, j), -np.inf)
        total[0, :] = -np.inf  # every class but the last keeps at least one bin
        arg = total.argmax(axis=0)
        best = total[arg, idx]
        args.append(arg)
    cuts = []
    j = n
    for arg in reversed(args):
        j = int(arg[j])
        cuts.append(j)
    return [float(edges[c]) for c in sorted(cuts)]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Two-class Otsu threshold of ``values``: voxels ``> t`` are the bright class."""
    return multiotsu_thresholds(values, 2, bins)[0]


def body_mask(volume: np.ndarray, air_threshold: float | str | None = AIR_THRESHOLD_HU) -> np.ndarray:
    """Boolean body mask of ``volume`` (X, Y, Z): largest component above the air threshold, holes filled.

    ``air_threshold="auto"`` (or None) uses the two-class Otsu threshold of the whole volume, for images
    in arbitrary units (MRI). Holes are filled per axial slice first, because lungs and the airway
    touch the top and bottom of a cropped scan and are not enclosed in 3D.
    """
    vol = np.asarray(volume)
    if air_threshold in (None, "auto"):
        air_threshold = otsu_threshold(vol)
    fg = vol > float(air_threshold)
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return ndimage.binary_fill_holes(body)


def bone_threshold(values: np.ndarray, method: str = "multiotsu", classes: int = 4, bins: int = 256) -> float:
    """The bone threshold of the intensities ``values`` inside the body.

    ``otsu``: two classes, enough when the body holds no gas and bone is a large share of the voxels.
    ``multiotsu``: the lower bound of the brightest of ``classes`` classes, robust to lungs and gas.
    """
    if method == "otsu":
        return otsu_threshold(values, bins)
    if method == "multiotsu":
        return multiotsu_thresholds(values, classes, bins)[-1]
    raise ValueError(f"unknown segmentation method {method!r}; choose one of {METHODS}")


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without the connected components (26-connectivity) smaller than ``min_size`` voxels."""
    if min_size <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def segment_bone(
    volume: np.ndarray,
    method: str = "multiotsu",
    classes: int = 4,
    air_threshold: float | str | None = AIR_THRESHOLD_HU,
    min_size: int = 0,
    bins: int = 256,
) -> np.ndarray:
    """Boolean bone mask of ``volume`` (X, Y, Z), same shape; see the module docstring for the steps."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"segment_bone expects a 3-D volume (X, Y, Z), got shape {vol.shape}")
    body = body_mask(vol, air_threshold)
    if not body.any():
        return body
    t = bone_threshold(vol[body], method, classes, bins)
    return remove_small_components(body & (vol > t), int(min_size))


def segment_params(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`segment_bone` from a config block (method, classes, ...)."""
    air = cfg.get("air_threshold", AIR_THRESHOLD_HU)
    return {
        "method": str(cfg.get("method", "multiotsu")),
        "classes": int(cfg.get("classes", 4)),
        "air_threshold": air if air in (None, "auto") else float(air),
        "min_size": int(cfg.get("min_size", 0) or 0),
        "bins": int(cfg.get("bins", 256)),
    }
