"""Tissue labels, the phantom's deterministic random streams and its shape checks."""

from __future__ import annotations

import numpy as np

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
