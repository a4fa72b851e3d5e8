"""Find training volumes that are near-copies of test volumes: ``python -m mr2ct.leakcheck train=DIR test=DIR``.

The original project's test scores were inflated by ~150 training volumes that were rotated or noised
copies of test volumes. This check needs no manifest: it compares the volumes themselves.

Each volume becomes a *signature*: resampled to a ``grid``³ cube (area averaging: the recipe's noise
averages out), smoothed, clipped to robust percentiles and standardised (so the recipe's intensity
shift and scale do not matter). A test signature is also rotated about the array centre by each angle
of ``angles_deg`` about each of the three axes (the recipe rotates by N(0, 10°) about one axis; the
rotation is done in voxel-index space like the recipe's, so anisotropic grids are handled). The score
of a (train, test) pair is the highest normalised cross-correlation (NCC, in [-1, 1]) over those
rotations; pairs scoring at least ``threshold`` are reported as leaks.

Exit status: 0 clean, 1 leaks found, 2 usage error (``mr2ct: error: ...``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mr2ct.config import CONFIG_DIR, set_project_root
from mr2ct.data.augment import list_nifti, load_volume

log = logging.getLogger("mr2ct.leakcheck")

import os
HP=float(os.environ.get("HP","0"))
DEFAULT_ANGLES = (-32.0, -24.0, -16.0, -8.0, 8.0, 16.0, 24.0, 32.0)


@dataclass(frozen=True)
class Leak:
    train: str
    test: str
    score: float
    angle_deg: tuple[float, float, float]  # rotation of the test volume that matched best


def signature(volume: np.ndarray | torch.Tensor, grid: int = 32, sigma: float = 1.0, percentiles: Sequence[float] = (1.0, 99.0)) -> torch.Tensor:
    """(X, Y, Z) volume -> standardised (grid, grid, grid) float32 tensor (zero mean, unit std)."""
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    x = F.adaptive_avg_pool3d(x, (grid, grid, grid)) if min(x.shape[2:]) >= grid else F.interpolate(x, size=(grid,) * 3, mode="trilinear")
    lo, hi = np.percentile(x.numpy(), [float(percentiles[0]), float(percentiles[1])])
    x = x.clamp(float(lo), float(hi))
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    if HP > 0:
        x = x - _gaussian_blur(x, HP)
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


def rotated_signatures(sig: torch.Tensor, shape: Sequence[int], angles: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """(R, grid³) standardised, flattened signatures of ``sig`` rotated by each of ``angles``."""
    thetas = torch.stack([_rotation_theta(a, shape) for a in angles])
    grid = F.affine_grid(thetas, [len(angles), 1, *sig.shape], align_corners=False)
    out = F.grid_sample(sig[None, None].expand(len(angles), 1, *sig.shape), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.flatten(1)
    out = out - out.mean(dim=1, keepdim=True)
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _flat(sig: torch.Tensor) -> torch.Tensor:
    v = sig.flatten() - sig.mean()
    return v / v.norm().clamp_min(1e-6)


def score_matrix(
    train: Sequence[str | Path],
    test: Sequence[str | Path],
    grid: int = 32,
    sigma: float = 1.0,
    angles_deg: Sequence[float] = DEFAULT_ANGLES,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n_train, n_test): max NCC over the test volume's rotations; and the index of the best rotation."""
    angles = rotations(angles_deg)
    test_rot = []
    for path in test:
        vol, _ = load_volume(path)
        test_rot.append(rotated_signatures(signature(vol, grid, sigma), vol.shape, angles))
    bank = torch.cat(test_rot)  # (n_test * R, grid³)
    scores = np.zeros((len(train), len(test)), dtype=np.float32)
    best = np.zeros((len(train), len(test)), dtype=np.int64)
    for i, path in enumerate(train):
        vol, _ = load_volume(path)
        ncc = (bank @ _flat(signature(vol, grid, sigma))).view(len(test), len(angles))
        s, b = ncc.max(dim=1)
        scores[i], best[i] = s.numpy(), b.numpy()
    return scores, best


def find_leaks(
    train_dir: str | Path,
    test_dir: str | Path,
    threshold: float = 0.9,
    grid: int = 32,
    sigma: float = 1.0,
    angles_deg: Sequence[float] = DEFAULT_ANGLES,
) -> tuple[list[Leak], np.ndarray]:
    """Pairs (train file, test file) whose score reaches ``threshold``, best first; and the full score matrix."""
    train, test = list_nifti(train_dir), list_nifti(test_dir)
    scores, best = score_matrix(train, test, grid, sigma, angles_deg)
    angles = rotations(angles_deg)
    leaks = [
        Leak(str(train[i]), str(test[j]), float(scores[i, j]), angles[best[i, j]])
        for i, j in zip(*np.nonzero(scores >= threshold))
    ]
    return sorted(leaks, key=lambda leak: -leak.score), scores


def check(cfg: DictConfig) -> list[Leak]:
    """Run every (train, test) folder pair of ``cfg`` and log a summary; returns all leaks."""
    pairs = cfg.get("pairs") or [{"train": cfg.train, "test": cfg.test}]
    leaks: list[Leak] = []
    for pair in pairs:
        if not pair.get("train") or not pair.get("test"):
            raise FileNotFoundError("leakcheck needs train=DIR and test=DIR")
        found, scores = find_leaks(pair["train"], pair["test"], float(cfg.threshold), int(cfg.grid), float(cfg.sigma), list(cfg.angles_deg))
        clean = scores[scores < float(cfg.threshold)]
        log.info(
            "%s vs %s: %d x %d volumes, %d suspicious pairs (score >= %.3f); highest clean score %.3f",
            pair["train"], pair["test"], scores.shape[0], scores.shape[1], len(found), float(cfg.threshold),
            float(clean.max()) if clean.size else float("nan"),
        )
        leaks += found
    return leaks


def format_leaks(leaks: Sequence[Leak]) -> str:
    lines = [f"  {leak.score:.3f}  train {leak.train}  ~  test {leak.test}  (test rotated {list(leak.angle_deg)} deg)" for leak in leaks]
    return "\n".join([f"{len(leaks)} training volume(s) look like copies of test volumes (score  train  ~  test):", *lines])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="leakcheck")
def main(cfg: DictConfig) -> None:
    try:
        leaks = check(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"mr2ct: error: {err}", file=sys.stderr)
        sys.exit(2)
    if leaks:
        print(format_leaks(leaks), flush=True)
        sys.exit(1)
    print("mr2ct leakcheck: no near-copies of test volumes in the training data", flush=True)


if __name__ == "__main__":
    set_project_root()
    main()
