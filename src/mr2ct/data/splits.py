"""Leakage-safe train/val/test splits by source subject (the library behind ``python -m mr2ct.split``).

``DIR`` holds one folder per domain (``a=mri``, ``b=ct``, optionally ``bone=...`` masks); the files of
both domains are grouped by source subject, and whole subjects are drawn for validation and test, so
every augmented copy of a subject lands on the same side. Subject ids come from each folder's
``manifest.csv`` (written by ``mr2ct-augment``) or, for files it does not list, from ``pattern``
(a regex whose first group is the subject id of a file stem).

Only subjects with files in both domains can be validation/test subjects (evaluation is paired); of
them only the originals are used for evaluation (augmented copies of evaluation subjects are listed
under ``excluded`` and used nowhere). The split is written as JSON, paths relative to the JSON file::

    {"train_a": [...], "train_b": [...], "val": [{"a", "b", "name"[, "bone"]}], "test": [...],
     "excluded": [...], "subjects": {"train": [...], "val": [...], "test": [...]}, "seed": 0, ...}

and read by the NIfTI data module: ``python -m mr2ct.train data=nifti data.split_file=DIR/split.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mr2ct.data.manifest import MANIFEST, SUBJECT_PATTERN, read_manifest, subject_id
from mr2ct.formats import list_volumes, volume_stem


DEFAULT_PATTERN = SUBJECT_PATTERN


def subjects_of(folder: str | Path, manifest: str | Path | None = None, pattern: str = DEFAULT_PATTERN) -> dict[Path, tuple[str, bool]]:
    """``{file: (subject id, is original)}`` for the NIfTI files of ``folder``.

    ``manifest`` defaults to ``folder/manifest.csv`` when it exists; files it does not list fall back to
    ``pattern`` (original = the stem is its own subject id).
    """
    folder = Path(folder)
    rows: dict[str, dict[str, str]] = {}
    path = Path(manifest) if manifest else folder / MANIFEST
    if path.is_file():
        rows = {r["file"]: r for r in read_manifest(path)}
    elif manifest:
        raise FileNotFoundError(f"manifest not found: {path}")
    out = {}
    for f in list_volumes(folder):
        if f.name in rows:
            row = rows[f.name]
            out[f] = (row["subject"], row.get("augmentation", "original") == "original")
        else:
            sid = subject_id(volume_stem(f), pattern)
            out[f] = (sid, sid == volume_stem(f))
    return out


def make_split(
    root: str | Path,
    a: str = "mri",
    b: str = "ct",
    bone: str | None = None,
    manifest: str | None = None,
    pattern: str = DEFAULT_PATTERN,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The split as a dict of absolute paths (see the module docstring for the layout)."""
    root = Path(root)
    folders = {"a": root / a, "b": root / b}
    files = {d: subjects_of(f, manifest, pattern) for d, f in folders.items()}
    bones = {volume_stem(p): p for p in list_volumes(root / bone)} if bone else {}
    subjects = sorted({s for d in files.values() for s, _ in d.values()})
    by_subject = {d: {s: [f for f, (sid, _) in files[d].items() if sid == s] for s in subjects} for d in files}
    paired = [s for s in subjects if by_subject["a"][s] and by_subject["b"][s]]

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1, int(round(fraction * len(subjects))))

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val > len(paired):
        raise ValueError(
            f"{n_test} test + {n_val} validation subjects requested but only {len(paired)} of {len(subjects)} subjects "
            f"have files in both {folders['a']} and {folders['b']} (evaluation needs pairs)"
        )
    if n_test + n_val >= len(subjects):
        raise ValueError(f"no training subject left: {len(subjects)} subjects, {n_test} test, {n_val} validation")
    order = [paired[i] for i in np.random.default_rng(int(seed)).permutation(len(paired))]
    held = {"test": sorted(order[:n_test]), "val": sorted(order[n_test : n_test + n_val])}
    train = sorted(set(subjects) - set(held["test"]) - set(held["val"]))

    def pairs(subject: str) -> tuple[list[dict[str, str]], list[Path]]:
        stems_b = {volume_stem(f): f for f in by_subject["b"][subject]}
        cands = [(f, stems_b[volume_stem(f)]) for f in by_subject["a"][subject] if volume_stem(f) in stems_b]
        originals = [(fa, fb) for fa, fb in cands if files["a"][fa][1] and files["b"][fb][1]]
        chosen = originals or cands
        if not chosen:
            raise ValueError(f"subject {subject}: no MRI and CT share a file stem (paired files need one)")
        recs = []
        for fa, fb in chosen:
            rec = {"a": str(fa), "b": str(fb), "name": volume_stem(fa)}
            if bone:
                if volume_stem(fa) not in bones:
                    raise FileNotFoundError(f"no bone mask in {root / bone} for {fa.name}")
                rec["bone"] = str(bones[volume_stem(fa)])
            recs.append(rec)
        used = {f for pair in chosen for f in pair}
        rest = [f for d in ("a", "b") for f in by_subject[d][subject] if f not in used]
        return recs, rest

    split: dict[str, Any] = {
        "train_a": [str(f) for s in train for f in by_subject["a"][s]],
        "train_b": [str(f) for s in train for f in by_subject["b"][s]],
        "val": [],
        "test": [],
        "excluded": [],
    }
    for part in ("val", "test"):
        for s in held[part]:
            recs, rest = pairs(s)
            split[part] += recs
            split["excluded"] += [str(f) for f in rest]
    if not split["train_a"] or not split["train_b"]:
        raise ValueError("the training side lacks one domain: every MRI or every CT subject was held out")
    split.update(subjects={"train": train, **held}, seed=int(seed), test_fraction=float(test_fraction), val_fraction=float(val_fraction))
    return split


def _relative(split: dict[str, Any], base: Path) -> dict[str, Any]:
    def rel(p: str) -> str:
        return os.path.relpath(p, base)

    out = dict(split)
    for key in ("train_a", "train_b", "excluded"):
        out[key] = [rel(p) for p in split[key]]
    for key in ("val", "test"):
        out[key] = [{k: (v if k == "name" else rel(v)) for k, v in rec.items()} for rec in split[key]]
    return out


def write_split(split: dict[str, Any], path: str | Path, overwrite: bool = True) -> Path:
    """Write ``split`` as JSON with paths relative to the file's folder (the folder tree can move)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output exists: {path} (pass overwrite=true to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_relative(split, path.parent.resolve()), indent=1))
    return path


def read_split(path: str | Path) -> dict[str, Any]:
    """A split file (``python -m mr2ct.split``) with its paths made absolute; checks the keys the data module needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    split = json.loads(path.read_text())
    missing = [k for k in ("train_a", "train_b", "val", "test") if k not in split]
    if missing:
        raise ValueError(f"{path}: split file lacks {missing}")
    base = path.parent.resolve()

    def absolute(p: str) -> str:
        return str((base / p).resolve())

    for key in ("train_a", "train_b", "excluded"):
        split[key] = [absolute(p) for p in split.get(key, [])]
    for key in ("val", "test"):
        split[key] = [{k: (v if k == "name" else absolute(v)) for k, v in rec.items()} for rec in split[key]]
    return split
