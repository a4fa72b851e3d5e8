"""Procedural, deterministic 3D synthetic spine phantom (the embedded default dataset).

Nothing is stored on disk: every sample is generated on the fly from integer seeds.

The geometry (a tissue label map) comes from an *anatomy seed*, the intensities from a
*render seed*.  ``make_phantom(seed=s)`` uses ``s`` for both, so one call gives a
**paired** sample (same anatomy in both modalities); unpaired training data simply uses
different seeds for the MRI and the CT domain.

Axis convention
---------------
Arrays are indexed ``(X, Y, Z)``:

* ``X`` -- left-right,
* ``Y`` -- posterior -> anterior (index 0 is the patient's back),
* ``Z`` -- inferior -> superior; the spine runs along this (last) axis and spans all of it.

Anatomy
-------
All sizes are defined in millimetres and rasterised with ``spacing``, so any shape works.
In-plane sizes are given for a reference field of view of 128 mm and scaled by
``min(FOV_x, FOV_y) / 128`` so that the body always fills most of the X-Y field of view
(with some air around it).  The same scale factor is applied along Z, keeping the anatomy
isotropic; the number of vertebrae is chosen to fit the Z extent.

Each sample contains a stack of vertebrae along a smooth centreline with a scoliotic
(lateral, X) sinusoidal bend of random amplitude (maximum inclination up to ~20 deg),
a mild sagittal (Y) curve and small random axial rotations per vertebra.  A vertebra is a
waisted elliptic-cylinder body (cortical shell + trabecular core) plus posterior elements:
two pedicles, a laminar arch around the spinal canal, a spinous process pointing
posteriorly (and slightly caudally) and two transverse processes pointing laterally
(shell + core where thick enough, cortical otherwise).  Intervertebral discs fill the gaps
between bodies; the spinal canal holds CSF and a cord.  Everything sits in paraspinal
muscle inside an elliptical body outline with a subcutaneous fat layer and skin, in air.

The module only depends on numpy and scipy (no torch import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "TISSUES",
    "MRI_CONTRASTS",
    "Phantom",
    "make_anatomy",
    "make_phantom",
    "render_ct",
    "render_mri",
]

#: Tissue label values used in :attr:`Phantom.labels`.
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "muscle": 2,
    "skin": 3,
    "cortical": 4,
    "trabecular": 5,
    "disc": 6,
    "csf": 7,
    "cord": 8,
}

_REF_FOV_MM = 128.0

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


@dataclass(frozen=True)
class Phantom:
    """One synthetic spine sample; all arrays have shape ``(X, Y, Z)``.

    Attributes
    ----------
    ct : np.ndarray
        float32 ``(X, Y, Z)``, CT in Hounsfield units (air -1000, cortical bone ~1000-1500).
    mri : np.ndarray
        float32 ``(X, Y, Z)``, T2-like MRI in arbitrary units, ``>= 0`` (roughly 0..1000).
    bone : np.ndarray
        uint8 ``(X, Y, Z)``, 1 where the label is cortical or trabecular bone
        (all vertebral parts), else 0.
    labels : np.ndarray
        uint8 ``(X, Y, Z)``, tissue label map with values from :data:`TISSUES`.
    spacing : tuple[float, float, float]
        Voxel size in mm along ``(X, Y, Z)``.
    """

    ct: np.ndarray
    mri: np.ndarray
    bone: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent deterministic generator for ``(seed, stream)``."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed}")
    return np.random.default_rng([seed, stream])


def _check_shape_spacing(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape_t = tuple(int(n) for n in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape_t) != 3 or len(spacing_t) != 3:
        raise ValueError(f"shape and spacing must have 3 entries, got {shape!r}, {spacing!r}")
    if min(shape_t) < 4:
        raise ValueError(f"every dimension must be >= 4 voxels, got {shape_t}")
    if min(spacing_t) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing_t}")
    return shape_t, spacing_t  # type: ignore[return-value]


def _capsule_sdf(
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


def _capsule(
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
    d = _capsule_sdf(u, v, w, a, b, scale)
    solid = d <= radius
    core = d <= radius - shell / min(scale)
    return solid, core


# ----------------------------------------------------------------------------- anatomy


def make_anatomy(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Rasterise a random spine anatomy as a tissue label map.

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(X, Y, Z)`` in voxels (each >= 4).
    spacing : tuple of float
        Voxel size in mm along ``(X, Y, Z)``.
    seed : int
        Non-negative anatomy seed; the result is a deterministic function of
        ``(shape, spacing, seed)``.

    Returns
    -------
    np.ndarray
        uint8 ``(X, Y, Z)`` label map with values from :data:`TISSUES`.
    """
    shape, spacing = _check_shape_spacing(shape, spacing)
    rng = _rng(seed, 0)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    vox = max(spacing)  # thin structures are at least one voxel thick
    fov_x, fov_y, fov_z = nx * sx, ny * sy, nz * sz
    s = min(fov_x, fov_y) / _REF_FOV_MM  # anatomy scale factor

    # Centred coordinate axes (mm), as open grids.
    xs = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)
    ys = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)
    zs = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)
    X = xs[:, None, None]
    Y = ys[None, :, None]
    Z = zs[None, None, :]
    z_lo = float(zs[0]) - sz / 2.0

    labels = np.zeros(shape, dtype=np.uint8)

    # ---- body outline, skin, subcutaneous fat, muscle --------------------------------
    ax0 = rng.uniform(0.44, 0.47) * fov_x
    ay0 = rng.uniform(0.40, 0.44) * fov_y
    sup = rng.uniform(2.0, 2.6)  # super-ellipse exponent (2 = ellipse; larger = boxier torso)
    taper_amp = rng.uniform(0.0, 0.05)
    taper_phase = rng.uniform(0.0, 2.0 * math.pi)
    taper = 1.0 + taper_amp * np.sin(math.pi * zs / fov_z + taper_phase)  # slow change along z
    ax = (ax0 * taper)[None, None, :]
    ay = (ay0 * taper)[None, None, :]
    skin_t = max(rng.uniform(1.5, 2.5) * s, min(sx, sy))
    fat_t = max(rng.uniform(4.0, 8.0) * s, min(sx, sy))

    ex, ey = np.abs(X) ** sup, np.abs(Y) ** sup  # pow on 1-D axes only (speed)

    def _ellipse(shrink: float) -> np.ndarray:
        return ex * (ax - shrink) ** -sup + ey * (ay - shrink) ** -sup <= 1.0

    labels[_ellipse(0.0)] = TISSUES["skin"]
    labels[_ellipse(skin_t)] = TISSUES["fat"]
    labels[_ellipse(skin_t + fat_t)] = TISSUES["muscle"]

    # ---- spine parameters ------------------------------------------------------------
    # Vertebral period (body height + disc) between 18 and 28 mm at reference scale;
    # the count is drawn first so that the stack fits the Z extent.
    p_min, p_max = 18.0 * s, 28.0 * s
    n_lo = max(1, math.ceil(fov_z / p_max))
    n_hi = max(n_lo, math.floor(fov_z / p_min))
    n_vert = int(rng.integers(n_lo, n_hi + 1))
    period = fov_z / n_vert
    phase = rng.uniform(0.0, 1.0) * period
    # Vertebra centres cover the field of view plus one extra on each end.
    z_centres = z_lo - period + phase + period * np.arange(n_vert + 3)
    nv = len(z_centres)

    # Centreline (canal centre) x_c(z), y_c(z): scoliotic lateral bend + sagittal curve.
    cobb = math.radians(rng.uniform(0.0, 20.0))  # maximum inclination of the bend
    lam = rng.uniform(1.2, 2.5) * fov_z
    amp_x = min(math.tan(cobb) * lam / (2.0 * math.pi), 0.08 * fov_x)
    phi_x = rng.uniform(0.0, 2.0 * math.pi)
    amp_y = rng.uniform(0.0, 4.0) * s
    lam_y = rng.uniform(1.5, 3.0) * fov_z
    phi_y = rng.uniform(0.0, 2.0 * math.pi)
    y0 = -rng.uniform(0.25, 0.30) * ay0  # canal sits in the posterior part of the body

    def centre(z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        kx, ky = 2.0 * math.pi / lam, 2.0 * math.pi / lam_y
        cx = amp_x * np.sin(kx * np.asarray(z) + phi_x)
        cy = y0 + amp_y * np.sin(ky * np.asarray(z) + phi_y)
        dcx = amp_x * kx * np.cos(kx * np.asarray(z) + phi_x)
        dcy = amp_y * ky * np.cos(ky * np.asarray(z) + phi_y)
        return cx, cy, dcx, dcy

    # Per-vertebra sizes (mm), smooth-ish variation around a per-sample mean.
    def per_vertebra(lo: float, hi: float, jitter: float) -> np.ndarray:
        base = rng.uniform(lo, hi)
        return base * (1.0 + rng.uniform(-jitter, jitter, size=nv))

    disc_frac = rng.uniform(0.2, 0.3)
    rx_b = per_vertebra(11.0, 15.0, 0.05) * s  # body lateral semi-axis
    ry_b = per_vertebra(8.5, 11.5, 0.05) * s  # body AP semi-axis
    waist = rng.uniform(0.03, 0.10)
    rc_x = per_vertebra(7.0, 9.0, 0.05) * s  # canal semi-axes
    rc_y = per_vertebra(5.0, 6.5, 0.05) * s
    rot = np.radians(rng.uniform(-5.0, 5.0, size=nv))  # axial rotation per vertebra
    arch_t = max(rng.uniform(3.0, 4.5) * s, 1.2 * vox)
    ped_r = max(rng.uniform(3.0, 4.0) * s, 0.8 * vox)
    sp_len = rng.uniform(10.0, 16.0) * s
    sp_r = max(rng.uniform(2.5, 3.5) * s, 0.8 * vox)
    sp_tilt = math.radians(rng.uniform(15.0, 35.0))
    tp_len = rng.uniform(12.0, 18.0) * s
    tp_r = max(rng.uniform(2.5, 3.5) * s, 0.8 * vox)
    cort_t = max(rng.uniform(1.0, 2.0), 1.01 * vox)

    bone = np.zeros(shape, dtype=bool)
    trab = np.zeros(shape, dtype=bool)
    disc = np.zeros(shape, dtype=bool)

    hb = 0.5 * period * (1.0 - disc_frac)  # body half-height
    gap = period - 2.0 * hb  # disc height
    wl = 0.1 * hb  # the arch sits slightly cranial
    hl = 0.6 * hb  # arch half-height
    disc_margin = 0.5 * vox + 1.5 * s  # discs overlap the next body a little (tilt)
    # Bounding extent of one vertebra in its local frame (mm), to crop the work region.
    r_loc = float(
        max(
            rc_x.max() + arch_t + tp_len + 2.0 * tp_r,
            rc_y.max() + 2.0 * ry_b.max(),
            rc_y.max() + arch_t + sp_len + sp_r,
            rx_b.max(),
        )
    ) + vox
    w_loc = max(hb + gap + disc_margin, wl + hl + sp_len * math.tan(sp_tilt) + 1.6 * sp_r) + vox

    def _crop(axis: np.ndarray, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))

    for k in range(nv):
        zk = float(z_centres[k])
        cx, cy, dcx, dcy = (float(a) for a in centre(zk))

        # Local frame: w along the centreline tangent, u lateral, v anterior; then an
        # axial rotation about w (centred on the canal, as in real scoliotic rotation).
        ew = np.array([dcx, dcy, 1.0])
        ew /= np.linalg.norm(ew)
        eu = np.array([1.0, 0.0, 0.0]) - ew[0] * ew
        eu /= np.linalg.norm(eu)
        ev = np.cross(ew, eu)
        c, sn = math.cos(rot[k]), math.sin(rot[k])
        eu, ev = c * eu + sn * ev, -sn * eu + c * ev

        # Work only inside an axis-aligned box around the tilted vertebra.
        sin_t = math.sqrt(max(0.0, 1.0 - ew[2] ** 2))
        rz = w_loc * ew[2] + r_loc * sin_t
        rxy = r_loc + w_loc * sin_t
        cs = (_crop(xs, cx - rxy, cx + rxy), _crop(ys, cy - rxy, cy + rxy), _crop(zs, zk - rz, zk + rz))
        if any(c_.stop <= c_.start for c_ in cs):
            continue
        sl = np.s_[cs[0], cs[1], cs[2]]

        dx = X[cs[0]] - np.float32(cx)
        dy = Y[:, cs[1]] - np.float32(cy)
        dz = Z[:, :, cs[2]] - np.float32(zk)
        u = (dx * eu[0] + dy * eu[1] + dz * eu[2]).astype(np.float32)
        v = (dx * ev[0] + dy * ev[1] + dz * ev[2]).astype(np.float32)
        w = (dx * ew[0] + dy * ew[1] + dz * ew[2]).astype(np.float32)

        rx, ry, rcx, rcy = rx_b[k], ry_b[k], rc_x[k], rc_y[k]
        vb = rcy + ry  # body centre (body's posterior wall touches the canal)

        # Vertebral body: waisted elliptic cylinder, shell + core.
        wn2 = np.clip((w / hb) ** 2, 0.0, 1.0)
        wf = 1.0 - waist * (1.0 - wn2)
        r2 = (u / (rx * wf)) ** 2 + ((v - vb) / (ry * wf)) ** 2
        body = (r2 <= 1.0) & (np.abs(w) <= hb)
        r2c = (u / np.maximum(rx * wf - cort_t, 1e-3)) ** 2 + ((v - vb) / np.maximum(ry * wf - cort_t, 1e-3)) ** 2
        body_core = (r2c <= 1.0) & (np.abs(w) <= hb - cort_t)

        # Disc above this vertebra: elliptic slab up to the next body (+ margin for tilt).
        if k + 1 < nv:
            rxd = 0.5 * (rx + rx_b[k + 1])
            ryd = 0.5 * (ry + ry_b[k + 1])
            vbd = 0.5 * (vb + rc_y[k + 1] + ry_b[k + 1])
            d = ((u / rxd) ** 2 + ((v - vbd) / ryd) ** 2 <= 1.0) & (w > hb - 0.5 * vox)
            d &= w < hb + gap + disc_margin
            disc[sl] |= d

        # Posterior elements (origin = canal centre).
        ring_o = (u / (rcx + arch_t)) ** 2 + (v / (rcy + arch_t)) ** 2 <= 1.0
        ring_i = (u / rcx) ** 2 + (v / rcy) ** 2 <= 1.0
        wl_ok = np.abs(w - wl) <= hl
        lamina = ring_o & ~ring_i & (v <= 0.3 * rcy) & wl_ok
        lam_core = (
            ((u / (rcx + arch_t - cort_t)) ** 2 + (v / (rcy + arch_t - cort_t)) ** 2 <= 1.0)
            & ~((u / (rcx + cort_t)) ** 2 + (v / (rcy + cort_t)) ** 2 <= 1.0)
            & (v <= 0.3 * rcy - cort_t)
            & (np.abs(w - wl) <= hl - cort_t)
        )

        solid = body | lamina
        core = body_core | lam_core
        ped_u = rcx + 0.5 * arch_t
        shapes = []
        for side in (-1.0, 1.0):
            # pedicle: from the lateral arch forward into the body
            shapes.append(
                _capsule(u, v, w, (side * ped_u, 0.0, wl), (side * 0.85 * ped_u, vb - 0.3 * ry, wl),
                         ped_r, cort_t, scale=(1.0, 1.0, 1.4))
            )
            # transverse process: laterally, slightly posterior
            shapes.append(
                _capsule(u, v, w, (side * ped_u, -0.3 * rcy, wl),
                         (side * (ped_u + tp_len), -0.3 * rcy - 0.2 * tp_len, wl),
                         tp_r, cort_t, scale=(1.0, 1.0, 1.2))
            )
        # spinous process: posteriorly and caudally, flattened laterally
        sp_a = (0.0, -(rcy + 0.5 * arch_t), wl)
        sp_b = (0.0, -(rcy + arch_t + sp_len), wl - sp_len * math.tan(sp_tilt))
        shapes.append(_capsule(u, v, w, sp_a, sp_b, sp_r, cort_t, scale=(0.8, 1.0, 1.6)))
        for sol, cor in shapes:
            solid |= sol
            core |= cor
        bone[sl] |= solid
        trab[sl] |= core & solid

    # ---- spinal canal (global tube along the centreline) -----------------------------
    cxz, cyz, _, _ = centre(zs)
    rcx_z = np.interp(zs, z_centres, rc_x)[None, None, :]
    rcy_z = np.interp(zs, z_centres, rc_y)[None, None, :]
    qx = X - cxz[None, None, :].astype(np.float32)
    qy = Y - cyz[None, None, :].astype(np.float32)
    canal = (qx / rcx_z) ** 2 + (qy / rcy_z) ** 2 <= 1.0
    cord_r = rng.uniform(0.45, 0.6)
    cord = (qx / (cord_r * rcx_z)) ** 2 + ((qy - 0.1 * rcy_z) / (cord_r * rcy_z)) ** 2 <= 1.0

    body_mask = labels > 0
    labels[disc & body_mask] = TISSUES["disc"]
    labels[canal & body_mask] = TISSUES["csf"]
    labels[cord & canal & body_mask] = TISSUES["cord"]
    bone &= ~canal & body_mask
    labels[bone] = TISSUES["cortical"]
    labels[bone & trab] = TISSUES["trabecular"]
    return labels


# ----------------------------------------------------------------------------- rendering


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


# ----------------------------------------------------------------------------- phantom


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    seed: int = 0,
    *,
    anatomy_seed: int | None = None,
    render_seed: int | None = None,
) -> Phantom:
    """Generate one paired synthetic spine sample (same anatomy in CT and MRI).

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(X, Y, Z)``; the spine runs along Z.
    spacing : tuple of float
        Voxel size in mm along ``(X, Y, Z)``.
    seed : int
        Default for both ``anatomy_seed`` and ``render_seed``.
    anatomy_seed : int, optional
        Seed of the geometry (:func:`make_anatomy`); defaults to ``seed``.
    render_seed : int, optional
        Seed of intensities, blur, bias field and noise (:func:`render_ct`,
        :func:`render_mri`); defaults to ``seed``.

    Returns
    -------
    Phantom
        ``ct`` float32 HU, ``mri`` float32 >= 0, ``bone`` uint8 and ``labels`` uint8,
        each of shape ``(X, Y, Z)``, plus ``spacing``.
    """
    shape, spacing = _check_shape_spacing(shape, spacing)
    a_seed = seed if anatomy_seed is None else anatomy_seed
    r_seed = seed if render_seed is None else render_seed
    labels = make_anatomy(shape, spacing, a_seed)
    bone = ((labels == TISSUES["cortical"]) | (labels == TISSUES["trabecular"])).astype(np.uint8)
    return Phantom(
        ct=render_ct(labels, r_seed),
        mri=render_mri(labels, r_seed),
        bone=bone,
        labels=labels,
        spacing=spacing,
    )
