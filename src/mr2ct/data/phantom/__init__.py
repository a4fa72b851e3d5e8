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

from dataclasses import dataclass

import numpy as np

from mr2ct.data.phantom.anatomy import make_anatomy
from mr2ct.data.phantom.render import MRI_CONTRASTS, render_ct, render_mri
from mr2ct.data.phantom.tissues import TISSUES, _check_shape_spacing

__all__ = [
    "TISSUES",
    "MRI_CONTRASTS",
    "Phantom",
    "make_anatomy",
    "make_phantom",
    "render_ct",
    "render_mri",
]


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
