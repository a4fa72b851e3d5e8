"""The phantom's geometry: a random spine in a torso, rasterised as a tissue label map.

All sizes are millimetres at a reference field of view of 128 mm, scaled to the volume's field of view
(see the package docstring). The random draws happen in a fixed order on one stream of the anatomy
seed, so a label map is a deterministic function of ``(shape, spacing, seed)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mr2ct.data.phantom.shapes import capsule
from mr2ct.data.phantom.tissues import TISSUES, _check_shape_spacing, _rng

_REF_FOV_MM = 128.0


@dataclass(frozen=True)
class _Grid:
    """Centred coordinate axes (mm) of a volume as 1-D arrays and open grids ``X`` (nx,1,1), ``Y``, ``Z``."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Grid:
        axes = [((np.arange(n) - (n - 1) / 2.0) * d).astype(np.float32) for n, d in zip(shape, spacing)]
        return cls(shape, spacing, *axes)

    @property
    def X(self) -> np.ndarray:  # noqa: N802
        return self.xs[:, None, None]

    @property
    def Y(self) -> np.ndarray:  # noqa: N802
        return self.ys[None, :, None]

    @property
    def Z(self) -> np.ndarray:  # noqa: N802
        return self.zs[None, None, :]

    @property
    def fov(self) -> tuple[float, float, float]:
        return tuple(n * d for n, d in zip(self.shape, self.spacing))  # type: ignore[return-value]

    @property
    def scale(self) -> float:
        """Anatomy scale factor: the smaller in-plane field of view over the reference's."""
        return min(self.fov[0], self.fov[1]) / _REF_FOV_MM

    @property
    def vox(self) -> float:
        """The coarsest voxel side: thin structures are at least this thick."""
        return max(self.spacing)

def _torso(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Label map (X, Y, Z) of the body outline: skin, subcutaneous fat, muscle, in air; and the body's
    AP semi-axis (mm), which places the spine."""
    (fov_x, fov_y, fov_z), s = grid.fov, grid.scale
    sx, sy, _ = grid.spacing
    ax0 = rng.uniform(0.44, 0.47) * fov_x
    ay0 = rng.uniform(0.40, 0.44) * fov_y
    sup = rng.uniform(2.0, 2.6)  # super-ellipse exponent (2 = ellipse; larger = boxier torso)
    taper_amp = rng.uniform(0.0, 0.05)
    taper_phase = rng.uniform(0.0, 2.0 * math.pi)
    taper = 1.0 + taper_amp * np.sin(math.pi * grid.zs / fov_z + taper_phase)  # slow change along z
    ax = (ax0 * taper)[None, None, :]
    ay = (ay0 * taper)[None, None, :]
    skin_t = max(rng.uniform(1.5, 2.5) * s, min(sx, sy))
    fat_t = max(rng.uniform(4.0, 8.0) * s, min(sx, sy))

    ex, ey = np.abs(grid.X) ** sup, np.abs(grid.Y) ** sup  # pow on 1-D axes only (speed)

    def _ellipse(shrink: float) -> np.ndarray:
        return ex * (ax - shrink) ** -sup + ey * (ay - shrink) ** -sup <= 1.0

    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[_ellipse(0.0)] = TISSUES["skin"]
    labels[_ellipse(skin_t)] = TISSUES["fat"]
    labels[_ellipse(skin_t + fat_t)] = TISSUES["muscle"]
    return labels, ay0


@dataclass
class _Spine:
    """Every drawn parameter of one spine (mm, radians); per-vertebra arrays have one entry per centre."""

    z_centres: np.ndarray
    period: float  # vertebral period: body height + disc
    lam: float
    amp_x: float
    phi_x: float
    amp_y: float
    lam_y: float
    phi_y: float
    y0: float
    disc_frac: float
    rx_b: np.ndarray  # body lateral semi-axis
    ry_b: np.ndarray  # body AP semi-axis
    waist: float
    rc_x: np.ndarray  # canal semi-axes
    rc_y: np.ndarray
    rot: np.ndarray  # axial rotation per vertebra
    arch_t: float
    ped_r: float
    sp_len: float
    sp_r: float
    sp_tilt: float
    tp_len: float
    tp_r: float
    cort_t: float

    def centre(self, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Centreline (canal centre) x_c(z), y_c(z) and its slopes: scoliotic lateral bend + sagittal curve."""
        kx, ky = 2.0 * math.pi / self.lam, 2.0 * math.pi / self.lam_y
        cx = self.amp_x * np.sin(kx * np.asarray(z) + self.phi_x)
        cy = self.y0 + self.amp_y * np.sin(ky * np.asarray(z) + self.phi_y)
        dcx = self.amp_x * kx * np.cos(kx * np.asarray(z) + self.phi_x)
        dcy = self.amp_y * ky * np.cos(ky * np.asarray(z) + self.phi_y)
        return cx, cy, dcx, dcy


def _draw_spine(grid: _Grid, rng: np.random.Generator, ay0: float) -> _Spine:
    fov_x, _, fov_z = grid.fov
    s, vox = grid.scale, grid.vox
    # Vertebral period (body height + disc) between 18 and 28 mm at reference scale;
    # the count is drawn first so that the stack fits the Z extent.
    p_min, p_max = 18.0 * s, 28.0 * s
    n_lo = max(1, math.ceil(fov_z / p_max))
    n_hi = max(n_lo, math.floor(fov_z / p_min))
    n_vert = int(rng.integers(n_lo, n_hi + 1))
    period = fov_z / n_vert
    phase = rng.uniform(0.0, 1.0) * period
    # Vertebra centres cover the field of view plus one extra on each end.
    z_lo = float(grid.zs[0]) - grid.spacing[2] / 2.0
    z_centres = z_lo - period + phase + period * np.arange(n_vert + 3)
    nv = len(z_centres)

    cobb = math.radians(rng.uniform(0.0, 20.0))  # maximum inclination of the bend
    lam = rng.uniform(1.2, 2.5) * fov_z
    amp_x = min(math.tan(cobb) * lam / (2.0 * math.pi), 0.08 * fov_x)
    phi_x = rng.uniform(0.0, 2.0 * math.pi)
    amp_y = rng.uniform(0.0, 4.0) * s
    lam_y = rng.uniform(1.5, 3.0) * fov_z
    phi_y = rng.uniform(0.0, 2.0 * math.pi)
    y0 = -rng.uniform(0.25, 0.30) * ay0  # canal sits in the posterior part of the body

    # Per-vertebra sizes (mm), smooth-ish variation around a per-sample mean.
    def per_vertebra(lo: float, hi: float, jitter: float) -> np.ndarray:
        base = rng.uniform(lo, hi)
        return base * (1.0 + rng.uniform(-jitter, jitter, size=nv))

    disc_frac = rng.uniform(0.2, 0.3)
    rx_b = per_vertebra(11.0, 15.0, 0.05) * s
    ry_b = per_vertebra(8.5, 11.5, 0.05) * s
    waist = rng.uniform(0.03, 0.10)
    rc_x = per_vertebra(7.0, 9.0, 0.05) * s
    rc_y = per_vertebra(5.0, 6.5, 0.05) * s
    rot = np.radians(rng.uniform(-5.0, 5.0, size=nv))
    return _Spine(
        z_centres=z_centres, period=period, lam=lam, amp_x=amp_x, phi_x=phi_x, amp_y=amp_y, lam_y=lam_y, phi_y=phi_y, y0=y0,
        disc_frac=disc_frac, rx_b=rx_b, ry_b=ry_b, waist=waist, rc_x=rc_x, rc_y=rc_y, rot=rot,
        arch_t=max(rng.uniform(3.0, 4.5) * s, 1.2 * vox),
        ped_r=max(rng.uniform(3.0, 4.0) * s, 0.8 * vox),
        sp_len=rng.uniform(10.0, 16.0) * s,
        sp_r=max(rng.uniform(2.5, 3.5) * s, 0.8 * vox),
        sp_tilt=math.radians(rng.uniform(15.0, 35.0)),
        tp_len=rng.uniform(12.0, 18.0) * s,
        tp_r=max(rng.uniform(2.5, 3.5) * s, 0.8 * vox),
        cort_t=max(rng.uniform(1.0, 2.0), 1.01 * vox),
    )


def _local_frame(sp: _Spine, k: int) -> tuple[float, float, float, np.ndarray, np.ndarray, np.ndarray]:
    """Centre (cx, cy, zk) of vertebra ``k`` and its frame: w along the centreline tangent, u lateral,
    v anterior, then an axial rotation about w (centred on the canal, as in real scoliotic rotation)."""
    zk = float(sp.z_centres[k])
    cx, cy, dcx, dcy = (float(a) for a in sp.centre(zk))
    ew = np.array([dcx, dcy, 1.0])
    ew /= np.linalg.norm(ew)
    eu = np.array([1.0, 0.0, 0.0]) - ew[0] * ew
    eu /= np.linalg.norm(eu)
    ev = np.cross(ew, eu)
    c, sn = math.cos(sp.rot[k]), math.sin(sp.rot[k])
    eu, ev = c * eu + sn * ev, -sn * eu + c * ev
    return cx, cy, zk, eu, ev, ew


def _posterior_elements(
    sp: _Spine, k: int, u: np.ndarray, v: np.ndarray, w: np.ndarray, wl: float, hl: float, vb: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(solid, core)`` of the laminar arch, pedicles, transverse and spinous processes of vertebra ``k``
    (local coordinates, origin = canal centre; the arch is centred at ``w = wl`` with half-height ``hl``)."""
    rcx, rcy, ry = sp.rc_x[k], sp.rc_y[k], sp.ry_b[k]
    arch_t, cort_t = sp.arch_t, sp.cort_t
    ring_o = (u / (rcx + arch_t)) ** 2 + (v / (rcy + arch_t)) ** 2 <= 1.0
    ring_i = (u / rcx) ** 2 + (v / rcy) ** 2 <= 1.0
    wl_ok = np.abs(w - wl) <= hl
    solid = ring_o & ~ring_i & (v <= 0.3 * rcy) & wl_ok
    core = (
        ((u / (rcx + arch_t - cort_t)) ** 2 + (v / (rcy + arch_t - cort_t)) ** 2 <= 1.0)
        & ~((u / (rcx + cort_t)) ** 2 + (v / (rcy + cort_t)) ** 2 <= 1.0)
        & (v <= 0.3 * rcy - cort_t)
        & (np.abs(w - wl) <= hl - cort_t)
    )
    ped_u = rcx + 0.5 * arch_t
    shapes = []
    for side in (-1.0, 1.0):
        # pedicle: from the lateral arch forward into the body
        shapes.append(
            capsule(u, v, w, (side * ped_u, 0.0, wl), (side * 0.85 * ped_u, vb - 0.3 * ry, wl),
                     sp.ped_r, cort_t, scale=(1.0, 1.0, 1.4))
        )
        # transverse process: laterally, slightly posterior
        shapes.append(
            capsule(u, v, w, (side * ped_u, -0.3 * rcy, wl),
                     (side * (ped_u + sp.tp_len), -0.3 * rcy - 0.2 * sp.tp_len, wl),
                     sp.tp_r, cort_t, scale=(1.0, 1.0, 1.2))
        )
    # spinous process: posteriorly and caudally, flattened laterally
    sp_a = (0.0, -(rcy + 0.5 * arch_t), wl)
    sp_b = (0.0, -(rcy + arch_t + sp.sp_len), wl - sp.sp_len * math.tan(sp.sp_tilt))
    shapes.append(capsule(u, v, w, sp_a, sp_b, sp.sp_r, cort_t, scale=(0.8, 1.0, 1.6)))
    for sol, cor in shapes:
        solid |= sol
        core |= cor
    return solid, core


def _vertebrae(grid: _Grid, sp: _Spine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean (X, Y, Z) masks of bone, trabecular core and discs of every vertebra of the spine."""
    vox, s = grid.vox, grid.scale
    period = sp.period
    nv = len(sp.z_centres)
    bone = np.zeros(grid.shape, dtype=bool)
    trab = np.zeros(grid.shape, dtype=bool)
    disc = np.zeros(grid.shape, dtype=bool)

    hb = 0.5 * period * (1.0 - sp.disc_frac)  # body half-height
    gap = period - 2.0 * hb  # disc height
    wl = 0.1 * hb  # the arch sits slightly cranial
    hl = 0.6 * hb  # arch half-height
    disc_margin = 0.5 * vox + 1.5 * s  # discs overlap the next body a little (tilt)
    # Bounding extent of one vertebra in its local frame (mm), to crop the work region.
    r_loc = float(
        max(
            sp.rc_x.max() + sp.arch_t + sp.tp_len + 2.0 * sp.tp_r,
            sp.rc_y.max() + 2.0 * sp.ry_b.max(),
            sp.rc_y.max() + sp.arch_t + sp.sp_len + sp.sp_r,
            sp.rx_b.max(),
        )
    ) + vox
    w_loc = max(hb + gap + disc_margin, wl + hl + sp.sp_len * math.tan(sp.sp_tilt) + 1.6 * sp.sp_r) + vox

    def _crop(axis: np.ndarray, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))

    for k in range(nv):
        cx, cy, zk, eu, ev, ew = _local_frame(sp, k)
        # Work only inside an axis-aligned box around the tilted vertebra.
        sin_t = math.sqrt(max(0.0, 1.0 - ew[2] ** 2))
        rz = w_loc * ew[2] + r_loc * sin_t
        rxy = r_loc + w_loc * sin_t
        cs = (_crop(grid.xs, cx - rxy, cx + rxy), _crop(grid.ys, cy - rxy, cy + rxy), _crop(grid.zs, zk - rz, zk + rz))
        if any(c_.stop <= c_.start for c_ in cs):
            continue
        sl = np.s_[cs[0], cs[1], cs[2]]

        dx = grid.X[cs[0]] - np.float32(cx)
        dy = grid.Y[:, cs[1]] - np.float32(cy)
        dz = grid.Z[:, :, cs[2]] - np.float32(zk)
        u = (dx * eu[0] + dy * eu[1] + dz * eu[2]).astype(np.float32)
        v = (dx * ev[0] + dy * ev[1] + dz * ev[2]).astype(np.float32)
        w = (dx * ew[0] + dy * ew[1] + dz * ew[2]).astype(np.float32)

        rx, ry, rcy, cort_t = sp.rx_b[k], sp.ry_b[k], sp.rc_y[k], sp.cort_t
        vb = rcy + ry  # body centre (body's posterior wall touches the canal)

        # Vertebral body: waisted elliptic cylinder, shell + core.
        wn2 = np.clip((w / hb) ** 2, 0.0, 1.0)
        wf = 1.0 - sp.waist * (1.0 - wn2)
        r2 = (u / (rx * wf)) ** 2 + ((v - vb) / (ry * wf)) ** 2
        body = (r2 <= 1.0) & (np.abs(w) <= hb)
        r2c = (u / np.maximum(rx * wf - cort_t, 1e-3)) ** 2 + ((v - vb) / np.maximum(ry * wf - cort_t, 1e-3)) ** 2
        body_core = (r2c <= 1.0) & (np.abs(w) <= hb - cort_t)

        # Disc above this vertebra: elliptic slab up to the next body (+ margin for tilt).
        if k + 1 < nv:
            rxd = 0.5 * (rx + sp.rx_b[k + 1])
            ryd = 0.5 * (ry + sp.ry_b[k + 1])
            vbd = 0.5 * (vb + sp.rc_y[k + 1] + sp.ry_b[k + 1])
            d = ((u / rxd) ** 2 + ((v - vbd) / ryd) ** 2 <= 1.0) & (w > hb - 0.5 * vox)
            d &= w < hb + gap + disc_margin
            disc[sl] |= d

        solid, core = _posterior_elements(sp, k, u, v, w, wl, hl, vb)
        solid |= body
        core |= body_core
        bone[sl] |= solid
        trab[sl] |= core & solid
    return bone, trab, disc


def _canal_and_cord(grid: _Grid, sp: _Spine, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (X, Y, Z) masks of the spinal canal (a tube along the centreline) and the cord inside it."""
    zs = grid.zs
    cxz, cyz, _, _ = sp.centre(zs)
    rcx_z = np.interp(zs, sp.z_centres, sp.rc_x)[None, None, :]
    rcy_z = np.interp(zs, sp.z_centres, sp.rc_y)[None, None, :]
    qx = grid.X - cxz[None, None, :].astype(np.float32)
    qy = grid.Y - cyz[None, None, :].astype(np.float32)
    canal = (qx / rcx_z) ** 2 + (qy / rcy_z) ** 2 <= 1.0
    cord_r = rng.uniform(0.45, 0.6)
    cord = (qx / (cord_r * rcx_z)) ** 2 + ((qy - 0.1 * rcy_z) / (cord_r * rcy_z)) ** 2 <= 1.0
    return canal, cord


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
    grid = _Grid.of(shape, spacing)
    labels, ay0 = _torso(grid, rng)
    spine = _draw_spine(grid, rng, ay0)
    bone, trab, disc = _vertebrae(grid, spine)
    canal, cord = _canal_and_cord(grid, spine, rng)

    body_mask = labels > 0
    labels[disc & body_mask] = TISSUES["disc"]
    labels[canal & body_mask] = TISSUES["csf"]
    labels[cord & canal & body_mask] = TISSUES["cord"]
    bone &= ~canal & body_mask
    labels[bone] = TISSUES["cortical"]
    labels[bone & trab] = TISSUES["trabecular"]
    return labels
