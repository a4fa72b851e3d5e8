"""Mode-collapse diagnostics of a set of translations: do outputs vary like their inputs, and keep their anatomy?"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: defaults of the collapse warnings: the real CTs of 4 phantom test MRIs score diversity 0.22, identifiability 1;
#: identical outputs score 0 and 1/N
MIN_DIVERSITY = 0.1
MIN_IDENTIFIABILITY = 0.75


def _common_grid(volumes: Sequence[Tensor], grid: Sequence[int] | None) -> Tensor:
    """Stack volumes (X, Y, Z) to (N, X', Y', Z'); resampled (trilinear) to ``grid`` or when shapes differ."""
    shapes = {tuple(v.shape) for v in volumes}
    if grid is None and len(shapes) == 1:
        return torch.stack([v.float() for v in volumes])
    size = tuple(int(g) for g in grid) if grid is not None else tuple(min(s[i] for s in shapes) for i in range(3))
    return torch.cat([F.interpolate(v.float()[None, None], size=size, mode="trilinear", align_corners=False)[0] for v in volumes])


def mean_pairwise_distance(volumes: Tensor) -> Tensor:
    """Mean over pairs i < j of the mean absolute voxel difference; ``volumes`` (N, ...), N >= 2."""
    n = volumes.shape[0]
    if n < 2:
        raise ValueError("pairwise distances need at least 2 volumes")
    flat = volumes.reshape(n, -1)
    d = [(flat[i] - flat[j]).abs().mean() for i, j in itertools.combinations(range(n), 2)]
    return torch.stack(d).mean()


def gradient_magnitude(volume: Tensor) -> Tensor:
    """|grad| by central differences (one-sided at the border), same shape as ``volume`` (X, Y, Z)."""
    grads = torch.gradient(volume.float())
    return torch.sqrt(sum(g * g for g in grads))


def ncc_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Normalised cross-correlation of every a_i with every b_j: ``a`` (N, ...), ``b`` (M, ...) -> (N, M)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.t()).float()


def collapse_diagnostics(inputs: Sequence[Tensor], outputs: Sequence[Tensor], grid: Sequence[int] | None = None) -> dict[str, float]:
    """Diversity ratio and identifiability of N >= 4 translations (normalised intensities).

    ``inputs[i]`` and ``outputs[i]``: volumes (X, Y, Z), the input of translation i and its output
    (resampled to a common ``grid`` when given or when shapes differ).

    - ``diversity``: mean pairwise distance between outputs / mean pairwise distance between inputs
      (mean absolute difference); near 0 = every input gets the same output.
    - ``identifiability``: the fraction of outputs whose own input is the best match among all inputs
      by NCC of gradient magnitudes; 1.0 = each output keeps its input's anatomy, 1/N = chance.
    """
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    if len(inputs) < 4:
        raise ValueError(f"collapse diagnostics need N >= 4 translations, got {len(inputs)}")
    x = _common_grid(list(inputs), grid)
    y = _common_grid(list(outputs), grid if grid is not None else tuple(x.shape[1:]))
    div_in = mean_pairwise_distance(x)
    diversity = float(mean_pairwise_distance(y) / div_in.clamp_min(1e-12))
    ncc = ncc_matrix(torch.stack([gradient_magnitude(v) for v in y]), torch.stack([gradient_magnitude(v) for v in x]))
    # a row with tied best matches (e.g. a constant output) counts as a miss
    best = ncc.max(dim=1).values
    own = ncc.diagonal()
    unique = (ncc >= best[:, None] - 1e-6).sum(dim=1) == 1
    identifiability = float(((own >= best - 1e-6) & unique).float().mean())
    return {"diversity": diversity, "identifiability": identifiability, "n": float(len(inputs))}


def collapse_warnings(diag: dict[str, float], min_diversity: float = MIN_DIVERSITY, min_identifiability: float = MIN_IDENTIFIABILITY) -> list[str]:
    """Human-readable warnings for diagnostics below the thresholds (empty list = no collapse seen)."""
    out = []
    if diag["diversity"] < min_diversity:
        out.append(f"diversity {diag['diversity']:.3f} < {min_diversity}: outputs vary much less than inputs (mode collapse?)")
    if diag["identifiability"] < min_identifiability:
        out.append(
            f"identifiability {diag['identifiability']:.2f} < {min_identifiability}: outputs do not keep their input's anatomy "
            f"(chance is {1 / diag['n']:.2f})"
        )
    return out


def thumbnail(volume: Tensor, max_side: int = 64) -> Tensor:
    """``volume`` (X, Y, Z) shrunk (trilinear) so that no side exceeds ``max_side``; on the CPU, float32.

    Keeps the memory of collapse diagnostics over many large volumes small.
    """
    v = volume.detach().float().cpu()
    scale = max_side / max(v.shape)
    if scale >= 1:
        return v.clone()
    size = [max(1, round(s * scale)) for s in v.shape]
    return F.interpolate(v[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]


def split_for_collapse(inputs: Sequence[Tensor], outputs: Sequence[Tensor], min_n: int = 4) -> tuple[list[Tensor], list[Tensor]]:
    """With fewer than ``min_n`` translations, cut each volume along Z (the spine) into equal blocks.

    Blocks of one volume hold different anatomy (other vertebrae), so the diagnostics stay meaningful
    for a small validation set (the phantom's default has 2 volumes).
    """
    n = len(inputs)
    if n == 0 or n >= min_n:
        return list(inputs), list(outputs)
    k = -(-min_n // n)
    xs, ys = [], []
    for x, y in zip(inputs, outputs):
        z = min(x.shape[-1], y.shape[-1]) // k * k
        xs += list(x[..., :z].chunk(k, dim=-1))
        ys += list(y[..., :z].chunk(k, dim=-1))
    return xs, ys
