"""Find training volumes that are near-copies of test volumes (the library behind ``python -m mr2ct.leakcheck``).

The original project's test scores were inflated by ~150 training volumes that were rotated or noised
copies of test volumes. This check needs no manifest: it compares the volumes themselves.

Each volume becomes a *signature*: resampled to a ``grid``³ cube (area averaging: the recipe's noise
averages out), smoothed, clipped to robust percentiles and standardised (so the recipe's intensity
shift and scale do not matter). A test signature is also rotated about the array centre by each angle
of ``angles_deg`` about each of the three axes (the recipe rotates by N(0, 10°) about one axis; the
rotation is done in voxel-index space like the recipe's, so anisotropic grids are handled). The score
of a (train, test) pair is the highest normalised cross-correlation (NCC, in [-1, 1]) over those
rotations; pairs scoring at least ``threshold`` are reported as leaks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mr2ct.data.checks import load_volume
from mr2ct.errors import ConfigError

log = logging.getLogger("mr2ct.leakcheck")



def angle_grid(max_deg: float = 40.0, step_deg: float = 1.0) -> tuple[float, ...]:
    """Non-zero angles -max..max in ``step`` steps (0 is always tried)."""
    n = int(round(max_deg / step_deg))
    return tuple(float(k * step_deg) for k in range(-n, n + 1) if k)


#: 1° steps up to ±40° (4 σ of the recipe's N(0, 10°)): the detail maps decorrelate within a few degrees
DEFAULT_ANGLES = angle_grid(40.0, 1.0)


@dataclass(frozen=True)
class Leak:
    train: str
    test: str
    score: float
    angle_deg: tuple[float, float, float]  # rotation of the test volume that matched best


def signature(
    volume: np.ndarray | torch.Tensor,
    grid: int = 48,
    sigma: float = 1.0,
    detail_sigma: float = 2.0,
    percentiles: Sequence[float] = (1.0, 99.0),
) -> torch.Tensor:
    """(X, Y, Z) volume -> (grid, grid, grid) float32 detail map, standardised.

    Resampled, clipped to robust percentiles, smoothed by ``sigma`` (grid voxels) against the noise,
    then the ``detail_sigma`` blur is subtracted: the body outline and slow intensity trends, which
    every subject shares, would otherwise dominate the correlation.
    """
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    x = F.adaptive_avg_pool3d(x, (grid, grid, grid)) if min(x.shape[2:]) >= grid else F.interpolate(x, size=(grid,) * 3, mode="trilinear")
    lo, hi = np.percentile(x.numpy(), [float(percentiles[0]), float(percentiles[1])])
    x = x.clamp(float(lo), float(hi))
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    if detail_sigma > 0:
        x = x - _gaussian_blur(x, detail_sigma)
    x = x - x.mean()
    return (x / x.std().clamp_min(1e-6))[0, 0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def rotations(angles_deg: Sequence[float]) -> list[tuple[float, float, float]]:
    """Identity plus each angle about each single axis: the recipe rotates about one axis at a time."""
    out = [(0.0, 0.0, 0.0)]
    for axis in range(3):
        for a in angles_deg:
            if a:
                r = [0.0, 0.0, 0.0]
                r[axis] = float(a)
                out.append((r[0], r[1], r[2]))
    return out


def _rotation_theta(angles_deg: tuple[float, float, float], shape: Sequence[int]) -> torch.Tensor:
    """affine_grid matrix (3, 4) rotating about the centre in the *original* voxel-index space.

    The signature grid is a cube, so a voxel-space rotation of the original (anisotropic) array is
    ``S⁻¹ R S`` in the cube's normalised coordinates, S = diag(shape / 2). affine_grid orders its
    coordinates (W, H, D) = (Z, Y, X).
    """
    rot = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles_deg):
        if not a:
            continue
        i, j = [k for k in range(3) if k != axis]
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    scale = torch.diag(torch.tensor([float(n) / 2.0 for n in shape], dtype=torch.float64))
    m = torch.linalg.inv(scale) @ rot @ scale  # in (X, Y, Z) order
    perm = [2, 1, 0]
    m = m[perm][:, perm]
    return torch.cat([m, torch.zeros(3, 1, dtype=torch.float64)], dim=1).float()


def rotated_signatures(
    sig: torch.Tensor, shape: Sequence[int], angles: Sequence[tuple[float, float, float]], radius: float = 0.8
) -> torch.Tensor:
    """(R, M) standardised signatures (M voxels of :func:`central_mask`) of ``sig`` rotated by each of ``angles``."""
    thetas = torch.stack([_rotation_theta(a, shape) for a in angles])
    grid = F.affine_grid(thetas, [len(angles), 1, *sig.shape], align_corners=False)
    out = F.grid_sample(sig[None, None].expand(len(angles), 1, *sig.shape), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _standardise(out.flatten(1)[:, central_mask(sig.shape[0], radius)])


def central_mask(grid: int, radius: float = 0.8) -> torch.Tensor:
    """Flat boolean mask of the ellipsoid inscribed in the grid (scaled by ``radius``).

    Correlation is computed inside it only: rotating a volume moves its corners out of the field of
    view and fills others with border values, which would lower the score of rotated copies.
    """
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2.0 - 1.0
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return (x**2 + y**2 + z**2 <= radius**2).flatten()


def _standardise(v: torch.Tensor) -> torch.Tensor:
    """Rows of (N, M) -> zero mean, unit norm (so a dot product is the NCC)."""
    v = v - v.mean(dim=-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@dataclass(frozen=True)
class Settings:
    """How volumes are compared (see the module docstring); defaults measured on phantoms (README)."""

    grid: int = 48
    sigma: float = 1.0
    detail_sigma: float = 2.0
    angles_deg: tuple[float, ...] = DEFAULT_ANGLES
    radius: float = 0.8
    threshold: float = 0.92


def score_matrix(train: Sequence[str | Path], test: Sequence[str | Path], settings: Settings = Settings()) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n_train, n_test): max NCC over the test volume's rotations; and the index of the best rotation.

    Each volume is read once; memory is (n_train + rotations) x grid³ floats.
    """
    st = settings
    angles = rotations(st.angles_deg)
    mask = central_mask(st.grid, st.radius)
    bank = torch.stack([signature(load_volume(p)[0], st.grid, st.sigma, st.detail_sigma).flatten()[mask] for p in train])
    bank = _standardise(bank)  # (n_train, M)
    scores = np.zeros((len(train), len(test)), dtype=np.float32)
    best = np.zeros((len(train), len(test)), dtype=np.int64)
    for j, path in enumerate(test):
        vol, _ = load_volume(path)
        sig = signature(vol, st.grid, st.sigma, st.detail_sigma)
        ncc = rotated_signatures(sig, vol.shape, angles, st.radius) @ bank.T  # (R, n_train)
        s, b = ncc.max(dim=0)
        scores[:, j], best[:, j] = s.numpy(), b.numpy()
    return scores, best


def find_leaks(train: Sequence[str | Path], test: Sequence[str | Path], settings: Settings = Settings()) -> tuple[list[Leak], np.ndarray]:
    """Pairs (train file, test file) whose score reaches the threshold, best first; and the full score matrix."""
    scores, best = score_matrix(train, test, settings)
    angles = rotations(settings.angles_deg)
    leaks = [
        Leak(str(train[i]), str(test[j]), float(scores[i, j]), angles[best[i, j]])
        for i, j in zip(*np.nonzero(scores >= settings.threshold))
    ]
    return sorted(leaks, key=lambda leak: -leak.score), scores


def settings_from(cfg: DictConfig | dict) -> Settings:
    return Settings(
        grid=int(cfg["grid"]),
        sigma=float(cfg["sigma"]),
        detail_sigma=float(cfg["detail_sigma"]),
        angles_deg=angle_grid(float(cfg["max_angle_deg"]), float(cfg["angle_step_deg"])),
        radius=float(cfg["radius"]),
        threshold=float(cfg["threshold"]),
    )


def check(pairs: Sequence[tuple[Sequence[str | Path], Sequence[str | Path]]], settings: Settings = Settings()) -> list[Leak]:
    """Run every (train files, test files) pair and log a summary; returns all leaks."""
    leaks: list[Leak] = []
    for train, test in pairs:
        if not train or not test:
            continue
        found, scores = find_leaks(train, test, settings)
        clean = scores[scores < settings.threshold]
        log.info(
            "%s... vs %s...: %d x %d volumes, %d suspicious pairs (score >= %.3f); highest other score %.3f",
            Path(train[0]).parent, Path(test[0]).parent, scores.shape[0], scores.shape[1], len(found), settings.threshold,
            float(clean.max()) if clean.size else float("nan"),
        )
        leaks += found
    return leaks


class LeakError(ConfigError):
    """Training data holds near-copies of evaluation volumes (raised by :func:`guard`)."""


def guard(datamodule: Any, settings: Settings = Settings()) -> None:
    """``data.leakcheck=true``: per domain, training (unpaired and paired) against validation and test, and
    validation against test.

    Needs file records (the NIfTI data module); raises :class:`LeakError` listing the pairs.
    """
    pairs = []
    for domain in ("a", "b"):
        train = [r["image"] for r in datamodule.records(f"train_{domain}") if "image" in r]
        train += [r[domain] for r in datamodule.records("train_pairs") if domain in r]
        val, test = ([r[domain] for r in datamodule.records(split) if domain in r] for split in ("val", "test"))
        pairs += [(sorted(set(train)), sorted(set(val + test))), (sorted(set(val)), sorted(set(test)))]
    if not any(train and held for train, held in pairs):
        log.warning("data.leakcheck: no training and evaluation files to compare (file-based data only)")
        return
    leaks = check(pairs, settings)
    if leaks:
        raise LeakError(format_leaks(leaks) + "\nremove them (or split by subject: python -m mr2ct.split) before training")
    log.info("data.leakcheck: no near-copies of validation/test volumes in the training data, none of test in validation")


def format_leaks(leaks: Sequence[Leak]) -> str:
    lines = [f"  {leak.score:.3f}  train {leak.train}  ~  test {leak.test}  (test rotated {list(leak.angle_deg)} deg)" for leak in leaks]
    return "\n".join([f"{len(leaks)} volume(s) look like copies of held-out volumes (score  train  ~  test; train/val ~ val/test):", *lines])
