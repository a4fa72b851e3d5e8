"""Offline augmentation with provenance: the original recipe, written to files with a manifest.

The original data set was inflated offline: each volume was kept and joined by 10 rotated and 10 noisy
copies. :func:`augment_folder` reproduces that recipe with the same transforms training uses on the fly
(:class:`~mr2ct.data.transforms.RandGaussianRotated`, :class:`~mr2ct.data.transforms.RandRecipeNoised`)
and records, per written file, its source subject, the augmentation and its parameters and a sha256 in
``manifest.csv``, so a split can keep every copy of a subject on one side (:mod:`mr2ct.data.splits`).

Noise is defined on normalised intensities ([-1, 1]) but copies are written in the input's units. The
map between the two is the linear part of the training normalisation, without its clipping, so it is
exactly invertible:

- CT (detected by air below -500 HU, or ``modality=ct``): ``u = (x - lo) / (hi - lo) * 2 - 1`` with
  ``(lo, hi)`` = ``ct_window`` (default [-1024, 3000] HU);
- MRI: the same with ``(lo, hi)`` = the volume's ``mri_percentiles`` (default 0.5 and 99.5).

A noise draw ``n`` in normalised units is therefore written as ``x + n * (hi - lo) / 2`` in input
units, and training's normalisation sees the recipe's mean and std (up to clipping at the window edges
for CT; for MRI the percentiles of the noisy copy differ slightly from the clean volume's). The copy is
float32; the affine of the input is kept (rotations resample about the array centre in voxel space).

Copies are deterministic per (seed, file stem, kind, index): adding files to the input folder does not
change the copies of the others, and an MRI and a CT with the same stem get the same rotations.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from mr2ct.data.checks import load_volume
from mr2ct.data.manifest import MANIFEST, sha256_file, write_manifest
from mr2ct.data.transforms import RandGaussianRotated, RandRecipeNoised
from mr2ct.formats import list_volumes, volume_stem

#: 1st-percentile intensity below which a volume is taken for a CT in HU (air is -1000 HU, MRI >= 0)
CT_AIR_THRESHOLD = -500.0


def save_volume(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.float32), affine), str(path))


def copy_seed(seed: int, stem: str, kind: str, index: int) -> int:
    """A 31-bit seed for one copy, stable across runs and independent of the other files."""
    digest = hashlib.sha256(f"{seed}/{stem}/{kind}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def intensity_range(
    volume: np.ndarray,
    modality: str = "auto",
    ct_window: Sequence[float] = (-1024.0, 3000.0),
    mri_percentiles: Sequence[float] = (0.5, 99.5),
) -> tuple[str, float, float]:
    """``(modality, lo, hi)``: input units ``lo``/``hi`` map to -1/+1 in normalised units."""
    if modality == "auto":
        modality = "ct" if float(np.percentile(volume, 1.0)) < CT_AIR_THRESHOLD else "mri"
    if modality == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
    elif modality == "mri":
        lo, hi = (float(v) for v in np.percentile(volume, [float(mri_percentiles[0]), float(mri_percentiles[1])]))
    else:
        raise ValueError(f"modality must be 'auto', 'ct' or 'mri', got {modality!r}")
    if hi <= lo:
        hi = lo + 1.0  # constant volume: any scale gives the same (constant + noise) copy
    return modality, lo, hi


def rotate_volume(
    volume: np.ndarray, seed: int, std_deg: float = 10.0, axes: Sequence[int] | None = None
) -> tuple[np.ndarray, list[float]]:
    """Rotate (X, Y, Z) ``volume`` like :class:`RandGaussianRotated` (always applied); returns the angles in degrees."""
    rot = RandGaussianRotated(["image"], std_deg=std_deg, prob=1.0, axes=axes)
    rot.set_random_state(seed=seed)
    out = rot({"image": torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]})["image"]
    angles = [float(np.degrees(a)) for a in rot._angles]
    return torch.as_tensor(out).numpy()[0].astype(np.float32, copy=False), angles


def noise_volume(
    volume: np.ndarray,
    seed: int,
    lo: float,
    hi: float,
    mean_range: Sequence[float] = (-0.1, 0.1),
    stds: Sequence[float] = (0.01, 0.05, 0.1),
) -> tuple[np.ndarray, float, float]:
    """Add :class:`RandRecipeNoised` noise in normalised units (``lo``/``hi`` -> -1/+1), return it in input units.

    Returns ``(noisy volume (X, Y, Z), mean, std)``, mean and std in normalised units.
    """
    scale = (hi - lo) / 2.0
    unit = torch.from_numpy((np.asarray(volume, dtype=np.float64) - lo) / scale - 1.0).float()[None]
    noise = RandRecipeNoised(["image"], prob=1.0, mean_range=mean_range, stds=stds)
    noise.set_random_state(seed=seed)
    noisy = torch.as_tensor(noise({"image": unit})["image"]).numpy()[0]
    back = (noisy.astype(np.float64) + 1.0) * scale + lo
    return back.astype(np.float32), noise._mean, noise._std


def augment_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    rotations: int = 10,
    noise_copies: int = 10,
    seed: int = 0,
    rotation_std_deg: float = 10.0,
    axes: Sequence[int] | None = None,
    modality: str = "auto",
    ct_window: Sequence[float] = (-1024.0, 3000.0),
    mri_percentiles: Sequence[float] = (0.5, 99.5),
    noise_mean_range: Sequence[float] = (-0.1, 0.1),
    noise_stds: Sequence[float] = (0.01, 0.05, 0.1),
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """Write each input volume, ``rotations`` rotated and ``noise_copies`` noisy copies, and ``manifest.csv``.

    Refuses (before writing anything) when one of those files exists already, unless ``overwrite``.

    Output names: ``<stem>.nii.gz`` (the original, copied byte for byte when already ``.nii.gz``),
    ``<stem>_rot00.nii.gz`` ..., ``<stem>_noise00.nii.gz`` ...; the subject id of all of them is the
    input stem. Returns the manifest rows.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"out must differ from in (would mix copies with their sources): {out_dir}")
    files = list_volumes(in_dir)
    planned = [out_dir / MANIFEST] + [
        out_dir / f"{volume_stem(src)}{tag}.nii.gz"
        for src in files
        for tag in ["", *(f"_rot{k:02d}" for k in range(int(rotations))), *(f"_noise{k:02d}" for k in range(int(noise_copies)))]
    ]
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"output exists: {existing[0]}{more} (pass overwrite=true to replace)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []

    def record(path: Path, stem: str, source: Path, kind: str, params: dict[str, Any]) -> None:
        rows.append(
            {
                "file": path.name,
                "subject": stem,
                "source": source.name,
                "augmentation": kind,
                "params": json.dumps(params, sort_keys=True),
                "sha256": sha256_file(path),
            }
        )

    for src in files:
        stem = volume_stem(src)
        volume, affine = load_volume(src)
        dst = out_dir / f"{stem}.nii.gz"
        if src.name.endswith(".nii.gz") and src.is_file():
            shutil.copyfile(src, dst)
        else:
            save_volume(dst, volume, affine)
        record(dst, stem, src, "original", {})
        for k in range(int(rotations)):
            s = copy_seed(seed, stem, "rot", k)
            rotated, angles = rotate_volume(volume, s, rotation_std_deg, axes)
            dst = out_dir / f"{stem}_rot{k:02d}.nii.gz"
            save_volume(dst, rotated, affine)
            record(dst, stem, src, "rotation", {"seed": s, "angles_deg": [round(a, 4) for a in angles], "interpolation": "linear"})
        if noise_copies:
            mod, lo, hi = intensity_range(volume, modality, ct_window, mri_percentiles)
        for k in range(int(noise_copies)):
            s = copy_seed(seed, stem, "noise", k)
            noisy, mean, std = noise_volume(volume, s, lo, hi, noise_mean_range, noise_stds)
            dst = out_dir / f"{stem}_noise{k:02d}.nii.gz"
            save_volume(dst, noisy, affine)
            record(
                dst, stem, src, "noise",
                {"seed": s, "mean": round(mean, 6), "std": std, "modality": mod, "unit_lo": round(lo, 4), "unit_hi": round(hi, 4)},
            )
    write_manifest(rows, out_dir / MANIFEST)
    return rows


def write_phantom_nifti(
    folder: str | Path,
    seeds: Sequence[int],
    modality: str,
    shape: Sequence[int] = (48, 48, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    prefix: str = "sub",
    compress: bool = True,
) -> list[Path]:
    """Write one phantom per seed as ``<prefix><seed:03d>.nii[.gz]`` (MRI, CT in HU, or bone mask), spacing in the affine.

    For demos, tests and benchmarks: the same seed gives the same anatomy in every modality.
    """
    from mr2ct.data.phantom import TISSUES, make_anatomy, render_ct, render_mri

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    paths = []
    for seed in seeds:
        labels = make_anatomy(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), int(seed))
        if modality == "mri":
            vol = render_mri(labels, int(seed))
        elif modality == "ct":
            vol = render_ct(labels, int(seed))
        elif modality == "bone":
            vol = np.isin(labels, [TISSUES["cortical"], TISSUES["trabecular"]]).astype(np.float32)
        else:
            raise ValueError(f"modality must be 'mri', 'ct' or 'bone', got {modality!r}")
        path = folder / f"{prefix}{int(seed):03d}.nii{'.gz' if compress else ''}"
        save_volume(path, vol, affine)
        paths.append(path)
    return paths
