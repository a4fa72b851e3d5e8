"""Rendering a tissue label map as CT (HU) or as T2-/T1-like MRI: per-sample tissue values, blur, bias, noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mr2ct.data.phantom.tissues import TISSUES, _rng

# Per-tissue intensity ranges; one value per tissue is drawn uniformly per sample.
# CT in Hounsfield units.
_CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "fat": (-120.0, -80.0),
    "muscle": (40.0, 60.0),
    "skin": (20.0, 40.0),
    "cortical": (1200.0, 1500.0),
    "trabecular": (200.0, 400.0),
    "disc": (70.0, 95.0),
    "csf": (5.0, 20.0),
    "cord": (30.0, 40.0),
}
# T2-weighted-like MRI, arbitrary units (roughly 0..1000).
_MRI_T2: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (650.0, 800.0),
    "muscle": (150.0, 230.0),
    "skin": (250.0, 350.0),
    "cortical": (5.0, 25.0),
    "trabecular": (320.0, 450.0),
    "disc": (700.0, 850.0),
    "csf": (880.0, 980.0),
    "cord": (480.0, 580.0),
}
# T1-weighted-like MRI: fat and fatty marrow bright, fluid (CSF) and disc dark, cortical bone and air dark.
_MRI_T1: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (820.0, 950.0),
    "muscle": (280.0, 360.0),
    "skin": (380.0, 470.0),
    "cortical": (5.0, 25.0),
    "trabecular": (560.0, 700.0),
    "disc": (230.0, 300.0),
    "csf": (60.0, 120.0),
    "cord": (400.0, 470.0),
}
#: MRI contrasts :func:`render_mri` can produce
MRI_CONTRASTS: dict[str, dict[str, tuple[float, float]]] = {"t2": _MRI_T2, "t1": _MRI_T1}


def _tissue_lut(ranges: dict[str, tuple[float, float]], rng: np.random.Generator) -> np.ndarray:
    """Look-up table label -> intensity, one uniform draw per tissue (in TISSUES order)."""
    lut = np.zeros(max(TISSUES.values()) + 1, dtype=np.float32)
    for name, lab in sorted(TISSUES.items(), key=lambda kv: kv[1]):
        lo, hi = ranges[name]
        lut[lab] = rng.uniform(lo, hi)
    return lut


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (X, Y, Z), got shape {labels.shape}")
    if labels.size and int(labels.max()) > max(TISSUES.values()):
        raise ValueError(f"unknown label {int(labels.max())}; valid labels are {TISSUES}")
    return labels.astype(np.intp, copy=False)


def render_ct(labels: np.ndarray, seed: int) -> np.ndarray:
    """Render a CT volume in Hounsfield units from a tissue label map.

    Per-tissue HU values are drawn per sample (cortical 1200-1500, trabecular 200-400,
    disc 70-95, muscle 40-60, skin 20-40, cord 30-40, CSF 5-20, fat -120..-80,
    air -1000), then a slight Gaussian blur (sigma 0.3-0.4 voxel, partial volume: thin
    cortical shells end up at ~90-99 % of their value) and Gaussian noise
    (sigma 10-20 HU) are applied.

    Parameters
    ----------
    labels : np.ndarray
        Integer ``(X, Y, Z)`` label map with values from :data:`TISSUES`.
    seed : int
        Non-negative render seed; the output is a deterministic function of it.

    Returns
    -------
    np.ndarray
        float32 ``(X, Y, Z)`` CT in HU.
    """
    lab = _check_labels(labels)
    rng = _rng(seed, 1)
    lut = _tissue_lut(_CT_HU, rng)
    blur = rng.uniform(0.3, 0.4)
    noise_sd = rng.uniform(10.0, 20.0)
    ct = lut[lab]
    ct = ndimage.gaussian_filter(ct, sigma=blur, mode="nearest")
    ct += rng.standard_normal(ct.shape, dtype=np.float32) * np.float32(noise_sd)
    return ct.astype(np.float32, copy=False)


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias field ``1 + b`` with ``max|b|`` drawn in 0.2-0.3.

    ``b`` is a random combination of separable low-frequency (co)sines, at most one
    period across the volume along each axis, evaluated with tensor products.
    """
    bases = []
    for n in shape:
        t = np.linspace(-1.0, 1.0, n)
        bases.append(
            np.stack(
                [np.ones_like(t), np.cos(0.5 * np.pi * t), np.sin(0.5 * np.pi * t),
                 np.cos(np.pi * t), np.sin(np.pi * t)],
                axis=1,
            )
        )  # (n, 5)
    freq = np.array([0, 1, 1, 2, 2], dtype=np.float64)
    decay = 1.0 / (1.0 + freq[:, None, None] + freq[None, :, None] + freq[None, None, :])
    coef = rng.standard_normal((5, 5, 5)) * decay
    coef[0, 0, 0] = 0.0
    field = np.einsum("abc,xa->xbc", coef, bases[0])
    field = np.einsum("xbc,yb->xyc", field, bases[1])
    field = np.einsum("xyc,zc->xyz", field, bases[2]).astype(np.float32)
    field -= field.mean()
    peak = float(np.abs(field).max())
    amp = rng.uniform(0.2, 0.3)
    if peak > 0:
        field *= np.float32(amp / peak)
    return field + np.float32(1.0)


def render_mri(labels: np.ndarray, seed: int, contrast: str = "t2") -> np.ndarray:
    """Render a T2-weighted-like (default) or T1-weighted-like MRI volume from a tissue label map.

    T2: cortical bone and air dark (~0-30), CSF, disc and fat bright (650-980), trabecular marrow
    medium (320-450), cord grey (480-580), muscle dark grey (150-230).
    T1 (``contrast="t1"``): fat (820-950) and fatty marrow (560-700) bright, cord and skin grey,
    muscle darker (280-360), disc (230-300) and CSF (60-120) dark, cortical bone and air dark.
    A slight partial-volume blur, a smooth multiplicative bias field (+-20-30 %) and Rician
    noise (magnitude of a complex Gaussian, sigma 8-20) are applied; output is ``>= 0``.

    Parameters
    ----------
    labels : np.ndarray
        Integer ``(X, Y, Z)`` label map with values from :data:`TISSUES`.
    seed : int
        Non-negative render seed; the output is a deterministic function of it.
    contrast : str
        ``"t2"`` or ``"t1"`` (:data:`MRI_CONTRASTS`).

    Returns
    -------
    np.ndarray
        float32 ``(X, Y, Z)`` MRI magnitude, non-negative.
    """
    if contrast not in MRI_CONTRASTS:
        raise ValueError(f"MRI contrast must be one of {sorted(MRI_CONTRASTS)}, got {contrast!r}")
    lab = _check_labels(labels)
    rng = _rng(seed, 2)
    lut = _tissue_lut(MRI_CONTRASTS[contrast], rng)
    blur = rng.uniform(0.3, 0.4)
    noise_sd = np.float32(rng.uniform(8.0, 20.0))
    img = ndimage.gaussian_filter(lut[lab], sigma=blur, mode="nearest")
    img *= _bias_field(lab.shape, rng)
    re = img + rng.standard_normal(img.shape, dtype=np.float32) * noise_sd
    im = rng.standard_normal(img.shape, dtype=np.float32) * noise_sd
    return np.sqrt(re * re + im * im).astype(np.float32, copy=False)
