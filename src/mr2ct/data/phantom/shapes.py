"""Signed-distance primitives the anatomy is built from."""

from __future__ import annotations

import numpy as np


def capsule_sdf(
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Distance to the segment ``a -> b`` in a space where axis ``i`` is divided by ``scale[i]``.

    Parameters
    ----------
    u, v, w : np.ndarray
        Broadcastable local coordinates (mm).
    a, b : tuple of float
        Segment end points (mm, unscaled).
    scale : tuple of float
        Per-axis stretch of the capsule (a radius ``r`` becomes ``r * scale[i]`` along axis i).

    Returns
    -------
    np.ndarray
        Scaled distance, broadcast shape of the inputs.
    """
    su, sv, sw = scale
    pu, pv, pw = (u - a[0]) / su, (v - a[1]) / sv, (w - a[2]) / sw
    bu, bv, bw = (b[0] - a[0]) / su, (b[1] - a[1]) / sv, (b[2] - a[2]) / sw
    bb = bu * bu + bv * bv + bw * bw
    t = np.clip((pu * bu + pv * bv + pw * bw) / bb, 0.0, 1.0)
    du, dv, dw = pu - t * bu, pv - t * bv, pw - t * bw
    return np.sqrt(du * du + dv * dv + dw * dw)


def capsule(
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    radius: float,
    shell: float,
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """``(solid, core)`` masks of a capsule whose cortical shell is at least ``shell`` mm."""
    d = capsule_sdf(u, v, w, a, b, scale)
    solid = d <= radius
    core = d <= radius - shell / min(scale)
    return solid, core
