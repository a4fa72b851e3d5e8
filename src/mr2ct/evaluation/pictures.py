"""Three-plane pictures of translations, for a person to look at: per case, a summary, a translate preview.

All volumes are numpy arrays indexed (X, Y, Z) (Z superior, the spine's axis); CT and synthetic CT in HU.
Planes go through the centre of the reference bone mask (else of the volume), so the spine is in view.
Rendering is headless (matplotlib's Agg backend); nothing here reads or writes volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CT_WINDOW = (-400.0, 1200.0)  # a bone window: soft tissue grey, cortical bone white
DIFF_MAX_HU = 500.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plane_centre(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel through which the three planes pass: the centre of mass of ``mask`` if it has any voxel."""
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal (Y, Z), coronal (X, Z) and axial (X, Y) slices through ``centre``, transposed for display
    (superior up in the first two; anterior up in the axial one)."""
    x, y, z = centre
    return [volume[x].T[::-1], volume[:, y].T[::-1], volume[:, :, z].T[::-1]]


def _outline(ax, mask: np.ndarray | None, colour: str) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.6)


def case_figure(
    path: str | Path,
    mri: np.ndarray,
    sct_hu: np.ndarray,
    ct_hu: np.ndarray,
    ref_bone: np.ndarray | None = None,
    pred_bone: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """PNG of one case: rows = sagittal, coronal, axial; columns = MRI, synthetic CT, real CT, |sCT - CT| (HU).

    Reference bone is outlined in green, the bone segmented from the synthetic CT in red, on both CTs.
    """
    plt = _pyplot()
    centre = plane_centre(ref_bone, ct_hu.shape)
    lo, hi = np.percentile(mri, [0.5, 99.5])
    cols = [
        ("MRI", mri, dict(cmap="gray", vmin=lo, vmax=hi)),
        ("synthetic CT", sct_hu, dict(cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])),
        ("real CT", ct_hu, dict(cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])),
        ("|sCT - CT| HU", np.abs(sct_hu - ct_hu), dict(cmap="magma", vmin=0, vmax=DIFF_MAX_HU)),
    ]
    fig, axes = plt.subplots(3, len(cols), figsize=(3.0 * len(cols), 8.4), squeeze=False)
    ref_planes = planes(ref_bone, centre) if ref_bone is not None else [None] * 3
    pred_planes = planes(pred_bone, centre) if pred_bone is not None else [None] * 3
    for c, (name, vol, style) in enumerate(cols):
        for r, sl in enumerate(planes(vol, centre)):
            ax = axes[r][c]
            im = ax.imshow(sl, interpolation="nearest", **style)
            if c in (1, 2):
                _outline(ax, ref_planes[r], "lime")
                _outline(ax, pred_planes[r], "red")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=[axes[r][c] for r in range(3)], fraction=0.04, pad=0.02)
    fig.suptitle(f"{title}   (green: reference bone, red: bone segmented from the synthetic CT)", fontsize=9)
    return _save(fig, path, plt)


def summary_figure(path: str | Path, rows: Sequence[Mapping[str, float | str]]) -> Path:
    """PNG with per-case bone Dice and MAE (HU) as bars, cases in the order given."""
    plt = _pyplot()
    names = [str(r["case"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.5 * len(rows) + 4), 3.6), squeeze=False)
    for ax, key, label in ((axes[0][0], "dice", "bone Dice"), (axes[0][1], "mae", "MAE in the body, HU")):
        values = [float(r.get(key, np.nan)) for r in rows]
        ax.bar(range(len(values)), values, color="steelblue")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{label}: mean {np.nanmean(values):.3g}", fontsize=9)
        if key == "dice":
            ax.set_ylim(0, 1)
    return _save(fig, path, plt)


def preview_figure(path: str | Path, mri: np.ndarray, sct_hu: np.ndarray, bone: np.ndarray | None = None, title: str = "") -> Path:
    """PNG of a translation without a reference: MRI and synthetic CT in three planes (bone outlined if given)."""
    plt = _pyplot()
    centre = plane_centre(bone, sct_hu.shape)
    lo, hi = np.percentile(mri, [0.5, 99.5])
    fig, axes = plt.subplots(2, 3, figsize=(9.0, 6.0), squeeze=False)
    bone_planes = planes(bone, centre) if bone is not None else [None] * 3
    for r, (vol, style) in enumerate(((mri, dict(cmap="gray", vmin=lo, vmax=hi)), (sct_hu, dict(cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])))):
        for c, sl in enumerate(planes(vol, centre)):
            axes[r][c].imshow(sl, interpolation="nearest", **style)
            if r == 1:
                _outline(axes[r][c], bone_planes[c], "red")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
    fig.suptitle(title or "MRI (top) and synthetic CT (bottom)", fontsize=9)
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
