"""Lightning data modules: unpaired training patches, paired whole-volume validation and test.

A training batch is ``{"a", "b": (B, 1, *patch), "mask_a", "mask_b": (B, 1, *patch) body masks,
"paired": (B,) bool}``. Unpaired samples draw MRI (A) and CT (B) independently, so no fixed A-B pairing
exists; a sample from a registered pair (``paired`` true) holds the same crop of both modalities. A validation/test batch holds one whole paired
volume: ``{"a", "b": (1, 1, X, Y, Z), "bone": (1, 1, X, Y, Z) if known, "name": [str]}``.
Intensities are normalised to [-1, 1] (see :mod:`mr2ct.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from monai.data import DataLoader as MonaiDataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    Spacingd,
)
from torch.utils.data import DataLoader

from mr2ct.data.checks import CheckVolumed, LoadVolumed
from mr2ct.data.patches import TrainPatches
from mr2ct.data.transforms import ROTATION_MODES, BodyMaskd, PhantomLoadd, normalize_ct, normalize_mri, patch_transforms
from mr2ct.errors import ConfigError
from mr2ct.formats import list_volumes, volume_stem



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
        patches_per_epoch: int | None = None,
        body_patch_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if patches_per_epoch is not None and int(patches_per_epoch) < 1:
            raise ConfigError(f"data.patches_per_epoch must be >= 1 or null, got {patches_per_epoch}")
        if not 0.0 <= float(body_patch_prob) <= 1.0:
            raise ConfigError(f"data.body_patch_prob must be in [0, 1], got {body_patch_prob}")
        self.patches_per_epoch = int(patches_per_epoch) if patches_per_epoch else None
        self.body_patch_prob = float(body_patch_prob)
        self.leakcheck = bool(leakcheck)  # read by the train entry (mr2ct.data.leaks.guard) before fitting
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.num_workers = int(num_workers)
        self.ct_window = [float(w) for w in ct_window]
        self.mri_percentiles = [float(p) for p in mri_percentiles]
        self.augment = dict(augment or {})
        self.noise_domains = list(self.augment.pop("noise_domains", ["mri", "ct"]))
        if unknown := sorted(set(self.noise_domains) - {"mri", "ct"}):
            raise ConfigError(f"data.augment.noise_domains takes mri and/or ct, got {unknown}")
        if (mode := self.augment.get("rotation_mode", "bilinear")) not in ROTATION_MODES:
            raise ConfigError(f"data.augment.rotation_mode must be {' or '.join(ROTATION_MODES)}, got {mode!r}")
        if cache not in ("memory", "disk", "none"):
            raise ConfigError(f"data.cache must be 'memory', 'disk' or 'none', got {cache!r}")
        if cache == "disk" and not cache_dir:
            raise ConfigError("data.cache=disk needs data.cache_dir")
        self.cache, self.cache_dir = cache, cache_dir
        self.datasets: dict[str, torch.utils.data.Dataset] = {}

    # -- what subclasses provide -------------------------------------------------------------------
    def records(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split``: ``train_a``, ``train_b`` (key "image"), ``train_pairs``, ``val``, ``test`` (keys a, b[, bone])."""
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

    def _patches(self, images: Sequence[str], modalities: Sequence[str], norms: Sequence[Callable]) -> Compose:
        masks = [f"{k}_body" for k in images]
        noisy = [k for k, m in zip(images, modalities) if m in self.noise_domains]
        return Compose(
            [
                *self.loader(list(images)),
                *norms,
                BodyMaskd(list(images), list(modalities), self.ct_window),
                patch_transforms(
                    images, self.patch_size, self.augment, self.samples_per_volume, masks, self.body_patch_prob, noisy
                ),
            ]
        )

    def train_dataset(self) -> TrainPatches:
        parts: dict[str, torch.utils.data.Dataset | None] = {}
        norm_a, norm_b = normalize_mri, normalize_ct
        chains = {
            "a": self._patches(["image"], ["mri"], [norm_a(["image"], self.mri_percentiles)]),
            "b": self._patches(["image"], ["ct"], [norm_b(["image"], self.ct_window)]),
            "pairs": self._patches(["a", "b"], ["mri", "ct"], [norm_a(["a"], self.mri_percentiles), norm_b(["b"], self.ct_window)]),
        }
        for n, (part, xform) in enumerate(chains.items()):
            records = self.records(f"train_{part}")
            if not records:
                parts[part] = None
                continue
            # MONAI's random transforms share one generator seeded from OS entropy at import; seeding them
            # from torch's seed (set by seed_everything) makes crops and augmentation follow `seed=`
            xform.set_random_state(seed=(torch.initial_seed() + n) % 2**32)
            parts[part] = self._dataset(records, xform, f"train_{part}")
        return TrainPatches(parts["a"] or [], parts["b"] or [], parts["pairs"], self.patches_per_epoch)

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


class PhantomDataModule(CycleGANDataModule):
    """The embedded synthetic spine phantom (no files): see :mod:`mr2ct.data.phantom`.

    Seeds are disjoint per split and domain, so no anatomy is shared between training and evaluation,
    and unpaired training MRI and CT never share an anatomy either. ``paired_fraction`` of the ``n_train``
    training anatomies are rendered in both modalities as registered pairs (semi-paired training with
    ``loss=+paired``); the others stay unpaired, so each domain still sees ``n_train`` anatomies.
    """

    def __init__(
        self,
        n_train: int = 12,
        n_val: int = 2,
        n_test: int = 4,
        shape: Sequence[int] = (48, 48, 64),
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        seed: int = 0,
        paired_fraction: float = 0.0,
        mri_contrast: str = "t2",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from mr2ct.data.phantom import MRI_CONTRASTS

        if not 0.0 <= float(paired_fraction) <= 1.0:
            raise ConfigError(f"data.paired_fraction must be in [0, 1], got {paired_fraction}")
        if mri_contrast not in MRI_CONTRASTS:
            raise ConfigError(f"data.mri_contrast must be one of {sorted(MRI_CONTRASTS)}, got {mri_contrast!r}")
        n_pairs = int(round(float(paired_fraction) * int(n_train)))
        self.n = {
            "train_a": int(n_train) - n_pairs,
            "train_b": int(n_train) - n_pairs,
            "train_pairs": n_pairs,
            "val": int(n_val),
            "test": int(n_test),
        }
        self.shape, self.spacing, self.seed = list(shape), list(spacing), int(seed)
        self.mri_contrast = mri_contrast

    def records(self, split: str) -> list[dict[str, Any]]:
        # one block of 10 000 seeds per split keeps every split's anatomies distinct for any n; pairs take
        # the seeds after the unpaired MRI's in the train_a block
        block = {"train_a": 0, "train_b": 1, "train_pairs": 0, "val": 2, "test": 3}[split]
        offset = block * 10_000 + self.seed * 100_000 + (self.n["train_a"] if split == "train_pairs" else 0)
        seeds = range(offset, offset + self.n[split])
        if split in ("train_a", "train_b"):
            modality = "mri" if split == "train_a" else "ct"
            return [{"seed": s, "modality": modality} for s in seeds]
        return [{"seed": s, "name": f"phantom_{s:06d}"} for s in seeds]

    def paired_keys(self, record: Mapping[str, Any]) -> list[str]:
        return ["a", "b", "bone"]

    def loader(self, keys: Sequence[str]) -> list[Callable]:
        return [PhantomLoadd(list(keys), self.shape, self.spacing, self.mri_contrast)]


class NiftiDataModule(CycleGANDataModule):
    """Unpaired folders of volumes (NIfTI, MetaImage, NRRD, DICOM series) for training; paired folders (matching file stems) for validation/test."""

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
        train_pairs_a: str | None = None,
        train_pairs_b: str | None = None,
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
            "train_pairs": (train_pairs_a, train_pairs_b, None),
        }
        if bool(train_pairs_a) != bool(train_pairs_b):
            raise FileNotFoundError("paired training needs both data.train_pairs_a (MRI) and data.train_pairs_b (CT)")
        self.spacing = list(spacing) if spacing else None
        self.orientation = orientation

    def records(self, split: str) -> list[dict[str, Any]]:
        if self.split_file and split != "train_pairs":  # pairs come from their folders
            from mr2ct.data.splits import read_split

            listed = read_split(self.split_file)[split]
            if split.startswith("train"):
                listed = [{"image": p, "name": volume_stem(p)} for p in listed]
            for path in (v for rec in listed for k, v in rec.items() if k != "name"):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"{self.split_file}: {split} file does not exist: {path}")
            return listed
        entry = self.folders[split]
        if split in ("train_a", "train_b") and not entry:
            if self.folders["train_pairs"][0]:  # pairs only: a supervised (pix2pix-style) run
                return []
            raise FileNotFoundError(f"data.{split} is not set: give data.train_a and data.train_b folders, or data.split_file")
        if isinstance(entry, str):
            modality = "ct" if split == "train_b" else "mri"  # read by CheckVolumed's HU check
            return [{"image": str(p), "name": volume_stem(p), "modality": modality} for p in list_volumes(entry)]
        folder_a, folder_b, folder_bone = entry
        if not folder_a or not folder_b:
            return []
        files_b = {volume_stem(p): p for p in list_volumes(folder_b)}
        files_bone = {volume_stem(p): p for p in list_volumes(folder_bone)} if folder_bone else {}
        out = []
        for pa in list_volumes(folder_a):
            stem = volume_stem(pa)
            if stem not in files_b:
                raise FileNotFoundError(f"{split}: no CT in {folder_b} matches MRI {pa.name} (paired files share a stem)")
            rec = {"a": str(pa), "b": str(files_b[stem]), "name": stem}
            if folder_bone:
                if stem not in files_bone:
                    raise FileNotFoundError(f"{split}: no bone mask in {folder_bone} matches {pa.name}")
                rec["bone"] = str(files_bone[stem])
            out.append(rec)
        lone = sorted(set(files_b) - {rec["name"] for rec in out})
        if split == "train_pairs" and lone:  # every training pair needs both halves: a lone CT is a mistake
            lone = ", ".join(lone[:3]) + (" ..." if len(lone) > 3 else "")
            raise FileNotFoundError(f"train_pairs: no MRI in {folder_a} matches CT {lone} (paired files share a stem)")
        return out

    def loader(self, keys: Sequence[str]) -> list[Callable]:
        keys = list(keys)
        xforms: list[Callable] = [
            LoadVolumed(keys),  # any format; unreadable, 2-D/4-D or a broken DICOM series -> InputError naming it
            CheckVolumed(keys, self.patch_size),  # 3-D, finite, big enough, CT in HU (warning)
            Orientationd(keys, axcodes=self.orientation),
        ]
        if self.spacing:
            modes = ["nearest" if k == "bone" else "bilinear" for k in keys]
            xforms.append(Spacingd(keys, pixdim=self.spacing, mode=modes))
            xforms.append(CheckVolumed(keys, self.patch_size, size_only=True))
        return xforms

