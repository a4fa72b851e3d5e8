"""Input checks for volumes: a bad file fails with one line naming it, before training starts.

:class:`LoadVolumed` reads any format of :mod:`mr2ct.formats` and turns a reader failure (unreadable,
truncated, corrupt header, 2-D or 4-D, a broken DICOM series) into an :class:`~mr2ct.errors.InputError`;
:class:`CheckVolumed` (through :func:`check_volume`, which the other tools call too) refuses volumes that
hold NaN/Inf or are too small for the patch, and warns about a CT that does not look like Hounsfield
units. MONAI wraps errors raised inside a transform chain in ``RuntimeError("applying transform
...")``; :func:`find_user_error` digs the :class:`InputError` back out for the entry point.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from mr2ct.errors import InputError
from mr2ct.formats import VolumeError, read_volume

log = logging.getLogger("mr2ct.data")

#: a dimension below this fraction of the patch would leave the padded patch mostly background
MIN_PATCH_FRACTION = 0.25


def _source(value: Any, fallback: str) -> str:
    meta = getattr(value, "meta", None)
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else fallback


class LoadVolumed(MapTransform):
    """Read each key's path (any format of :mod:`mr2ct.formats`) into a ``MetaTensor`` (1, X, Y, Z) with its
    RAS affine; a failure is one :class:`InputError` line naming the file."""

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                array, affine = read_volume(d[key])
            except (VolumeError, FileNotFoundError) as err:
                raise InputError(str(err)) from None
            meta = {"filename_or_obj": str(d[key]), "original_affine": affine, "spatial_shape": array.shape, "original_channel_dim": "no_channel"}
            d[key] = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine), meta=meta)
        return d


def check_volume(array: Any, path: str, patch_size: Sequence[int] | None = None) -> None:
    """Refuse NaN/Inf voxels, an axis of size 1 and (with ``patch_size``) a volume too small for the patch."""
    t = torch.as_tensor(array)
    spatial = tuple(int(s) for s in t.shape[-3:])
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise InputError(f"{path}: {n_bad} voxels are NaN or infinite")
    if min(spatial) < 2:
        raise InputError(f"{path}: degenerate volume of shape {list(spatial)} (an axis of size 1)")
    _check_size(path, spatial, patch_size)


def _check_size(path: str, spatial: tuple[int, ...], patch_size: Sequence[int] | None) -> None:
    if not patch_size:
        return
    need = [max(2, math.ceil(p * MIN_PATCH_FRACTION)) for p in patch_size]
    if any(s < n for s, n in zip(spatial, need)):
        raise InputError(
            f"{path}: volume {list(spatial)} is too small for patch {list(patch_size)} "
            f"(each axis needs >= {need}; pad the data or use a smaller data.patch_size)"
        )


class CheckVolumed(MapTransform):
    """Refuse volumes the networks cannot use; warn about a CT that is not in Hounsfield units.

    Expects channel-first volumes (1, X, Y, Z) after loading. Errors (:class:`InputError`):
    not 3-D (a 2-D slice, or a 4-D series with several volumes), NaN/Inf voxels, an axis of size 1,
    or an axis shorter than ``MIN_PATCH_FRACTION`` of ``patch_size`` (padding would make the patch
    mostly background). Warning: a CT (``ct_keys``, or key ``image`` of a record with
    ``modality: ct``) whose values never reach air (< -500) or stay within [-10, 10] (normalised?).
    """

    def __init__(
        self, keys: KeysCollection, patch_size: Sequence[int] | None = None, ct_keys: Sequence[str] = ("b",), size_only: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.patch_size = [int(p) for p in patch_size] if patch_size else None
        self.ct_keys = set(ct_keys)
        self.size_only = size_only  # a second pass after resampling: only the size can have changed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            path = _source(img, str(d.get("name", key)))
            spatial = tuple(int(s) for s in img.shape[1:])
            if img.shape[0] != 1 or len(spatial) != 3:
                shape = (*spatial,) if img.shape[0] == 1 else (*spatial, int(img.shape[0]))
                raise InputError(f"{path}: expected a 3-D volume, got shape {list(shape)} ({len(shape)}-D)")
            t = torch.as_tensor(img)
            if self.size_only:
                _check_size(path, spatial, self.patch_size)
                continue
            check_volume(t, path, self.patch_size)
            is_ct = key in self.ct_keys or (key == "image" and d.get("modality") == "ct")
            if is_ct:
                lo, hi = float(t.min()), float(t.max())
                if lo > -500 or (hi - lo) < 20:
                    msg = f"{path}: CT values range [{lo:.4g}, {hi:.4g}]: not Hounsfield units? (air is about -1000 HU)"
                    log.warning(msg)
                    warnings.warn(msg, stacklevel=2)
        return d


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z) float32 in file units with the header's scaling applied, affine (4, 4))``, any format,
    checked as training checks it (finite, no axis of size 1)."""
    array, affine = read_volume(path)
    check_volume(array, str(path))
    return array, affine


__all__ = ["CheckVolumed", "LoadVolumed", "check_volume", "load_volume", "MIN_PATCH_FRACTION"]
