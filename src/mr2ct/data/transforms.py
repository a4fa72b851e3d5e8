"""MONAI transform chains shared by every dataset: intensity normalisation, patch sampling, augmentation.

Intensities the networks see are in [-1, 1]:

- CT (domain B): Hounsfield units clipped to ``ct_window`` and scaled linearly; :func:`unit_to_hu`
  is the exact inverse inside the window, used to write synthetic CT back in HU.
- MRI (domain A): arbitrary units, robust percentile scaling (``mri_percentiles``) to [-1, 1].

Augmentation follows the original offline recipe, but on the fly: a rotation by an angle drawn from
N(0, sigma) about a random axis, and additive Gaussian noise whose mean is drawn from [-0.1, 0.1] and
whose std is drawn from {0.01, 0.05, 0.1}.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    MapTransform,
    RandomizableTransform,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    Rotate,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

#: value of air / background after normalisation; used to pad volumes smaller than a patch
BACKGROUND = -1.0


def hu_to_unit(hu: torch.Tensor | np.ndarray, window: Sequence[float]) -> Any:
    """Map Hounsfield units to [-1, 1]: clip to ``window`` = (lo, hi), then scale linearly."""
    lo, hi = float(window[0]), float(window[1])
    x = hu.clip(lo, hi) if isinstance(hu, np.ndarray) else hu.clamp(lo, hi)
    return (x - lo) / (hi - lo) * 2.0 - 1.0


def unit_to_hu(x: torch.Tensor | np.ndarray, window: Sequence[float]) -> Any:
    """Inverse of :func:`hu_to_unit` (values outside [-1, 1] are clipped first)."""
    lo, hi = float(window[0]), float(window[1])
    x = x.clip(-1.0, 1.0) if isinstance(x, np.ndarray) else x.clamp(-1.0, 1.0)
    return (x + 1.0) / 2.0 * (hi - lo) + lo


def normalize_ct(keys: KeysCollection, window: Sequence[float]) -> ScaleIntensityRanged:
    return ScaleIntensityRanged(keys, a_min=float(window[0]), a_max=float(window[1]), b_min=-1.0, b_max=1.0, clip=True)


def normalize_mri(keys: KeysCollection, percentiles: Sequence[float]) -> ScaleIntensityRangePercentilesd:
    return ScaleIntensityRangePercentilesd(
        keys, lower=float(percentiles[0]), upper=float(percentiles[1]), b_min=-1.0, b_max=1.0, clip=True
    )


#: interpolation of :class:`RandGaussianRotated` (``data.augment.rotation_mode``)
ROTATION_MODES = ("bilinear", "nearest")


class RandGaussianRotated(RandomizableTransform, MapTransform):
    """Rotate by an angle ~ N(0, ``std_deg``) about one randomly chosen axis (or about each of ``axes``).

    The original data set was inflated with 10 such rotations per volume; here every draw is new.
    ``mode``: ``bilinear`` (linear interpolation) or ``nearest`` (every output voxel is an input voxel,
    so a one-voxel cortical shell keeps its HU instead of being spread over two voxels at a lower
    value); border padding (the patch is cropped with a margin beforehand, so the border rarely shows).
    """

    def __init__(
        self,
        keys: KeysCollection,
        std_deg: float = 10.0,
        prob: float = 0.5,
        axes: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
        mode: str = "bilinear",
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if mode not in ROTATION_MODES:
            raise ValueError(f"rotation mode must be one of {ROTATION_MODES}, got {mode!r}")
        self.mode = mode
        self.std_rad = math.radians(std_deg)
        self.axes = tuple(axes) if axes is not None else None
        self._angles = (0.0, 0.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        angles = [0.0, 0.0, 0.0]
        axes = self.axes if self.axes is not None else (int(self.R.randint(3)),)
        for ax in axes:
            angles[ax] = float(self.R.normal(0.0, self.std_rad))
        self._angles = tuple(angles)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        rotate = Rotate(angle=self._angles, keep_size=True, mode=self.mode, padding_mode="border")
        for key in self.key_iterator(d):
            d[key] = rotate(d[key])
        return d


class RandRecipeNoised(RandomizableTransform, MapTransform):
    """Add Gaussian noise with mean ~ U(``mean_range``) and std drawn from ``stds`` (normalised units)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        mean_range: Sequence[float] = (-0.1, 0.1),
        stds: Sequence[float] = (0.01, 0.05, 0.1),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mean_range = (float(mean_range[0]), float(mean_range[1]))
        self.stds = tuple(float(s) for s in stds)
        self._mean, self._std, self._seed = 0.0, 0.0, 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._mean = float(self.R.uniform(*self.mean_range))
        self._std = float(self.stds[int(self.R.randint(len(self.stds)))])
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        gen = torch.Generator().manual_seed(self._seed)
        for key in self.key_iterator(d):
            img = d[key]
            noise = torch.randn(img.shape, generator=gen, dtype=torch.float32) * self._std + self._mean
            d[key] = img + noise.to(img.device, img.dtype)
        return d


class BodyMaskd(MapTransform):
    """Add a body mask (1, X, Y, Z) under ``<key>_body`` for each normalised volume ``key``.

    Body = largest component above the air threshold, holes filled (:func:`mr2ct.evaluation.segmentation.body_mask`). The
    threshold is -500 HU for CT (``modality="ct"``) and the volume's Otsu threshold for MRI. Deterministic,
    so a cached dataset computes it once per volume.
    """

    def __init__(self, keys: KeysCollection, modality: str | Sequence[str], ct_window: Sequence[float]) -> None:
        super().__init__(keys)
        self.modality = [modality] * len(self.keys) if isinstance(modality, str) else list(modality)
        self.ct_threshold = float(hu_to_unit(np.array(-500.0), ct_window))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mr2ct.evaluation.segmentation import body_mask

        d = dict(data)
        for key, modality in zip(self.key_iterator(d), self.modality):
            if f"{key}_body" in d:  # given (the phantom knows its anatomy)
                continue
            vol = np.asarray(d[key][0], dtype=np.float32)
            mask = body_mask(vol, self.ct_threshold if modality == "ct" else "auto")
            d[f"{key}_body"] = torch.from_numpy(mask[None].astype(np.float32))
        return d


def patch_transforms(
    keys: KeysCollection,
    patch_size: Sequence[int],
    augment: Mapping[str, Any] | None = None,
    samples_per_volume: int = 1,
    masks: Sequence[str] = (),
    body_prob: float = 0.0,
    noisy: Sequence[str] | None = None,
) -> Compose:
    """Random training patches of normalised volumes ``keys`` and their ``masks`` (one crop for all), with the recipe's augmentation.

    Volumes smaller than ``patch_size`` are padded with the background value (masks with 0). With rotation
    on, a patch 25 % larger is cropped, rotated and centre-cropped, so rotated corners hold real anatomy.
    ``samples_per_volume`` > 1 returns a list of patches from one loaded volume. With ``body_prob`` > 0 a
    patch's centre lies inside the first mask (the body) with probability ``body_prob`` and anywhere
    otherwise (MONAI's ``RandCropByPosNegLabeld``). Noise is added to the images named in ``noisy`` (default:
    all of them), never to the masks.
    """
    augment = dict(augment or {})
    images = [keys] if isinstance(keys, str) else list(keys)
    masks = list(masks)
    both = [*images, *masks]
    patch = [int(p) for p in patch_size]
    rot_std = float(augment.get("rotation_std_deg", 0.0))
    rot_prob = float(augment.get("rotation_prob", 0.0))
    rotate = rot_std > 0 and rot_prob > 0
    crop = [int(math.ceil(p * 1.25)) for p in patch] if rotate else patch
    xforms: list = [SpatialPadd(images, spatial_size=crop, mode="constant", value=BACKGROUND)]
    if masks:
        xforms.append(SpatialPadd(masks, spatial_size=crop, mode="constant", value=0.0))
    if masks and body_prob > 0:
        xforms.append(
            RandCropByPosNegLabeld(
                both, label_key=masks[0], spatial_size=crop, pos=float(body_prob), neg=1.0 - float(body_prob),
                num_samples=samples_per_volume, allow_smaller=True,
            )
        )
    elif samples_per_volume > 1:
        xforms.append(RandSpatialCropSamplesd(both, roi_size=crop, num_samples=samples_per_volume, random_size=False))
    else:
        xforms.append(RandSpatialCropd(both, roi_size=crop, random_size=False))
    if rotate:
        mode = str(augment.get("rotation_mode", "bilinear"))
        xforms += [RandGaussianRotated(both, std_deg=rot_std, prob=rot_prob, mode=mode), CenterSpatialCropd(both, roi_size=patch)]
    noise_prob = float(augment.get("noise_prob", 0.0))
    noisy = images if noisy is None else [k for k in images if k in noisy]
    if noise_prob > 0 and noisy:
        xforms.append(
            RandRecipeNoised(
                noisy,
                prob=noise_prob,
                mean_range=augment.get("noise_mean_range", (-0.1, 0.1)),
                stds=augment.get("noise_stds", (0.01, 0.05, 0.1)),
            )
        )
    xforms.append(EnsureTyped(both, dtype=torch.float32, track_meta=False))
    return Compose(xforms)


class PhantomLoadd(MapTransform):
    """Render the synthetic spine phantom of a record: ``{"seed", "modality"}`` or a paired ``{"seed"}``.

    Single-domain records produce ``"image"`` and its body mask ``"image_body"``; paired records produce
    ``"a"`` (MRI), ``"b"`` (CT), ``"bone"`` and the body masks ``"a_body"``/``"b_body"`` (the phantom knows
    its anatomy: body = every tissue but air), all shaped (1, X, Y, Z) with the phantom's spacing in the
    affine. ``contrast`` selects the MRI rendering ("t2" or "t1").
    """

    def __init__(self, keys: Sequence[str], shape: Sequence[int], spacing: Sequence[float], contrast: str = "t2") -> None:
        super().__init__(keys)
        self.shape, self.spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
        self.contrast = contrast

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mr2ct.data.phantom import TISSUES, make_anatomy, render_ct, render_mri

        d = dict(data)
        labels = make_anatomy(self.shape, self.spacing, d["seed"])
        body = (labels != TISSUES["air"]).astype(np.float32)
        affine = np.diag([*self.spacing, 1.0])
        mri = lambda: render_mri(labels, d["seed"], self.contrast)  # noqa: E731
        vols = {}
        if "modality" in d:
            vols["image"] = mri() if d["modality"] == "mri" else render_ct(labels, d["seed"])
            vols["image_body"] = body
        else:
            vols = {"a": mri(), "b": render_ct(labels, d["seed"]), "a_body": body, "b_body": body}
            if "bone" in self.keys:
                vols["bone"] = np.isin(labels, [TISSUES["cortical"], TISSUES["trabecular"]]).astype(np.float32)
        for key, vol in vols.items():
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None], affine=affine)
        return d
