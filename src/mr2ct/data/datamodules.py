"""Lightning data modules: unpaired training patches, paired whole-volume validation and test.

A training batch is ``{"a": (B, 1, *patch), "b": (B, 1, *patch)}`` with MRI (A) and CT (B) drawn
independently: the longer domain is walked through in the sampler's shuffled order, the shorter one is
resampled at random, so no fixed A-B pairing exists. A validation/test batch holds one whole paired
volume: ``{"a", "b": (1, 1, X, Y, Z), "bone": (1, 1, X, Y, Z) if known, "name": [str]}``.
Intensities are normalised to [-1, 1] (see :mod:`mr2ct.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from monai.data import DataLoader as MonaiDataLoader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Spacingd,
)
from torch.utils.data import DataLoader

from mr2ct.data.checks import CheckVolumed, SafeLoadImaged
from mr2ct.data.phantom import make_anatomy, render_ct, render_mri
from mr2ct.data.transforms import normalize_ct, normalize_mri, patch_transforms
from mr2ct.io import list_nifti, nifti_stem



class UnpairedDataset(torch.utils.data.Dataset):
    """Zip two datasets without pairing them: index ``i`` walks the longer one, the shorter is resampled.

    Items of ``a`` and ``b`` are dicts with key ``"image"`` (or lists of them, one per patch sampled
    from a volume); the result is ``{"a": ..., "b": ...}`` (or a list of such dicts).
    """

    def __init__(self, a: torch.utils.data.Dataset, b: torch.utils.data.Dataset) -> None:
        self.a, self.b = a, b
        self.len_a, self.len_b = len(a), len(b)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return max(self.len_a, self.len_b)

    def _index(self, i: int, n: int) -> int:
        # torch's RNG is seeded per worker by Lightning (seed_everything(workers=True)) and per epoch
        # by the sampler, so the resampled domain changes partner every epoch.
        return i % n if n == len(self) else int(torch.randint(n, (1,)).item())

    def __getitem__(self, i: int) -> Any:
        a = self.a[self._index(i, self.len_a)]
        b = self.b[self._index(i, self.len_b)]
        if isinstance(a, list):
            return [{"a": pa["image"], "b": pb["image"]} for pa, pb in zip(a, b)]
        return {"a": a["image"], "b": b["image"]}


class CycleGANDataModule(pl.LightningDataModule):
    """Shared machinery; subclasses say where volumes come from (:meth:`records`, :meth:`loader`)."""

    def __init__(
        self,
        patch_size: Sequence[int] = (96, 96, 96),
        batch_size: int = 2,
        samples_per_volume: int = 1,
        num_workers: int = 0,
        ct_window: Sequence[float] = (-1024.0, 3000.0),
        mri_percentiles: Sequence[float] = (0.5, 99.5),
        augment: Mapping[str, Any] | None = None,
        cache: str = "memory",
        cache_dir: str | None = None,
        leakcheck: bool = False,
    ) -> None:
        super().__init__()
        self.leakcheck = bool(leakcheck)  # read by the train entry (mr2ct.leakcheck.guard) before fitting
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.num_workers = int(num_workers)
        self.ct_window = [float(w) for w in ct_window]
        self.mri_percentiles = [float(p) for p in mri_percentiles]
        self.augment = dict(augment or {})
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"data.cache must be 'memory', 'disk' or 'none', got {cache!r}")
        if cache == "disk" and not cache_dir:
            raise ValueError("data.cache=disk needs data.cache_dir")
        self.cache, self.cache_dir = cache, cache_dir
        self.datasets: dict[str, torch.utils.data.Dataset] = {}

    # -- what subclasses provide -------------------------------------------------------------------
    def records(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split`` in ``train_a``, ``train_b`` (key "image"), ``val``, ``test`` (keys a, b[, bone])."""
        raise NotImplementedError

    def loader(self, keys: Sequence[str]) -> list[Callable]:
        """Transforms that turn a record into channel-first volumes in raw units under ``keys``."""
        raise NotImplementedError

    def paired_keys(self, record: Mapping[str, Any]) -> list[str]:
        """Volume keys a paired record yields: a, b and, when known, bone."""
        return [k for k in ("a", "b", "bone") if k in record]

    # -- datasets ---------------------------------------------------------------------------------
    def _dataset(self, data: list[dict[str, Any]], transform: Compose, name: str) -> torch.utils.data.Dataset:
        if self.cache == "memory":
            # Filled in this thread: with MONAI's thread pool a bad file's error reached sys.exit while
            # sibling threads were still inside torch ops, and the process aborted ("terminate called
            # without an active exception") instead of printing the one-line error.
            return CacheDataset(data, transform, progress=False, num_workers=0)
        if self.cache == "disk":
            return PersistentDataset(data, transform, cache_dir=str(Path(self.cache_dir) / name))
        return Dataset(data, transform)

    def train_dataset(self) -> UnpairedDataset:
        parts = {}
        for domain, norm in (("a", normalize_mri(["image"], self.mri_percentiles)), ("b", normalize_ct(["image"], self.ct_window))):
            xform = Compose(
                [*self.loader(["image"]), norm, patch_transforms(["image"], self.patch_size, self.augment, self.samples_per_volume)]
            )
            # MONAI's random transforms share one generator seeded from OS entropy at import; seeding them
            # from torch's seed (set by seed_everything) makes crops and augmentation follow `seed=`
            xform.set_random_state(seed=(torch.initial_seed() + (domain == "b")) % 2**32)
            parts[domain] = self._dataset(self.records(f"train_{domain}"), xform, f"train_{domain}")
        return UnpairedDataset(parts["a"], parts["b"])

    def paired_dataset(self, split: str) -> torch.utils.data.Dataset | None:
        data = self.records(split)
        if not data:
            return None
        keys = self.paired_keys(data[0])
        xform = Compose(
            [
                *self.loader(keys),
                normalize_mri(["a"], self.mri_percentiles),
                normalize_ct(["b"], self.ct_window),
                EnsureTyped(keys, dtype=torch.float32),
            ]
        )
        return self._dataset(data, xform, split)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self.train_dataset()
        for split in ("val", "test"):
            if stage in ("fit", "validate", None) and split == "val" or stage in ("test", None) and split == "test":
                if split not in self.datasets:
                    ds = self.paired_dataset(split)
                    if ds is not None:
                        self.datasets[split] = ds

    def train_dataloader(self) -> DataLoader:
        # MONAI's loader re-seeds the random transforms in each worker; with torch's, every worker would
        # hold a copy of one transform RNG state and draw the same patches and augmentations
        return MonaiDataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.datasets["train"]) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=list_data_collate,
        )

    def _paired_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            return []
        return DataLoader(self.datasets[split], batch_size=1, shuffle=False, num_workers=0, collate_fn=list_data_collate)

    def val_dataloader(self) -> DataLoader | list:
        return self._paired_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._paired_loader("test")


class PhantomLoadd(MapTransform):
    """Render the synthetic spine phantom of a record: ``{"seed", "modality"}`` or a paired ``{"seed"}``.

    Single-domain records produce ``"image"``; paired records produce ``"a"`` (MRI), ``"b"`` (CT) and
    ``"bone"``, all shaped (1, X, Y, Z) with the phantom's spacing in the affine.
    """

    def __init__(self, keys: Sequence[str], shape: Sequence[int], spacing: Sequence[float]) -> None:
        super().__init__(keys)
        self.shape, self.spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        labels = make_anatomy(self.shape, self.spacing, d["seed"])
        affine = np.diag([*self.spacing, 1.0])
        vols = {}
        if "modality" in d:
            vols["image"] = render_mri(labels, d["seed"]) if d["modality"] == "mri" else render_ct(labels, d["seed"])
        else:
            vols = {"a": render_mri(labels, d["seed"]), "b": render_ct(labels, d["seed"])}
            if "bone" in self.keys:
                from mr2ct.data.phantom import TISSUES

                vols["bone"] = np.isin(labels, [TISSUES["cortical"], TISSUES["trabecular"]]).astype(np.float32)
        for key, vol in vols.items():
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None], affine=affine)
        return d


class PhantomDataModule(CycleGANDataModule):
    """The embedded synthetic spine phantom (no files): see :mod:`mr2ct.data.phantom`.

    Seeds are disjoint per split and domain, so no anatomy is shared between training and evaluation,
    and training MRI and CT never share an anatomy either.
    """

    def __init__(
        self,
        n_train: int = 12,
        n_val: int = 2,
        n_test: int = 4,
        shape: Sequence[int] = (48, 48, 64),
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n = {"train_a": int(n_train), "train_b": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.shape, self.spacing, self.seed = list(shape), list(spacing), int(seed)

    def records(self, split: str) -> list[dict[str, Any]]:
        # one block of 10 000 seeds per split keeps every split's anatomies distinct for any n
        offset = {"train_a": 0, "train_b": 1, "val": 2, "test": 3}[split] * 10_000 + self.seed * 100_000
        seeds = range(offset, offset + self.n[split])
        if split.startswith("train"):
            modality = "mri" if split == "train_a" else "ct"
            return [{"seed": s, "modality": modality} for s in seeds]
        return [{"seed": s, "name": f"phantom_{s:06d}"} for s in seeds]

    def paired_keys(self, record: Mapping[str, Any]) -> list[str]:
        return ["a", "b", "bone"]

    def loader(self, keys: Sequence[str]) -> list[Callable]:
        return [PhantomLoadd(list(keys), self.shape, self.spacing)]


class NiftiDataModule(CycleGANDataModule):
    """Unpaired NIfTI folders for training; paired folders (matching file stems) for validation/test."""

    def __init__(
        self,
        train_a: str | None = None,
        train_b: str | None = None,
        val_a: str | None = None,
        val_b: str | None = None,
        val_bone: str | None = None,
        test_a: str | None = None,
        test_b: str | None = None,
        test_bone: str | None = None,
        spacing: Sequence[float] | None = None,
        orientation: str = "RAS",
        split_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # a split file (python -m mr2ct.split) replaces all folders: file lists per split
        self.split_file = split_file
        self.folders = {
            "train_a": train_a,
            "train_b": train_b,
            "val": (val_a, val_b, val_bone),
            "test": (test_a, test_b, test_bone),
        }
        self.spacing = list(spacing) if spacing else None
        self.orientation = orientation

    def records(self, split: str) -> list[dict[str, Any]]:
        if self.split_file:
            from mr2ct.data.augment import read_split

            listed = read_split(self.split_file)[split]
            if split.startswith("train"):
                listed = [{"image": p, "name": nifti_stem(p)} for p in listed]
            for path in (v for rec in listed for k, v in rec.items() if k != "name"):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"{self.split_file}: {split} file does not exist: {path}")
            return listed
        entry = self.folders[split]
        if split.startswith("train") and not entry:
            raise FileNotFoundError(f"data.{split} is not set: give data.train_a and data.train_b folders, or data.split_file")
        if isinstance(entry, str):
            modality = "ct" if split == "train_b" else "mri"  # read by CheckVolumed's HU check
            return [{"image": str(p), "name": nifti_stem(p), "modality": modality} for p in list_nifti(entry)]
        folder_a, folder_b, folder_bone = entry
        if not folder_a or not folder_b:
            return []
        files_b = {nifti_stem(p): p for p in list_nifti(folder_b)}
        files_bone = {nifti_stem(p): p for p in list_nifti(folder_bone)} if folder_bone else {}
        out = []
        for pa in list_nifti(folder_a):
            stem = nifti_stem(pa)
            if stem not in files_b:
                raise FileNotFoundError(f"{split}: no CT in {folder_b} matches MRI {pa.name} (paired files share a stem)")
            rec = {"a": str(pa), "b": str(files_b[stem]), "name": stem}
            if folder_bone:
                if stem not in files_bone:
                    raise FileNotFoundError(f"{split}: no bone mask in {folder_bone} matches {pa.name}")
                rec["bone"] = str(files_bone[stem])
            out.append(rec)
        return out

    def loader(self, keys: Sequence[str]) -> list[Callable]:
        keys = list(keys)
        xforms: list[Callable] = [
            SafeLoadImaged(keys, image_only=True, dtype=np.float32),  # unreadable file -> InputError naming it
            EnsureChannelFirstd(keys),
            CheckVolumed(keys, self.patch_size),  # 3-D, finite, big enough, CT in HU (warning)
            Orientationd(keys, axcodes=self.orientation),
        ]
        if self.spacing:
            modes = ["nearest" if k == "bone" else "bilinear" for k in keys]
            xforms.append(Spacingd(keys, pixdim=self.spacing, mode=modes))
            xforms.append(CheckVolumed(keys, self.patch_size, size_only=True))
        return xforms

