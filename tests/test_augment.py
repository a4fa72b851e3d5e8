"""Offline augmentation: the recipe's file counts, provenance manifest, determinism, units of the noise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mr2ct.data.augment import augment_folder, intensity_range, write_phantom_nifti
from mr2ct.data.checks import load_volume
from mr2ct.data.manifest import read_manifest, sha256_file

SHAPE, SPACING = (24, 24, 32), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_phantom_nifti(root / "mri", [1, 2], "mri", SHAPE, SPACING)
    write_phantom_nifti(root / "ct", [1, 2], "ct", SHAPE, SPACING)
    return root


def test_recipe_counts_manifest_and_determinism(raw, tmp_path):
    rows = augment_folder(raw / "ct", tmp_path / "a", rotations=3, noise_copies=2, seed=5)
    assert len(rows) == 2 * (1 + 3 + 2)
    assert {r["subject"] for r in rows} == {"sub001", "sub002"}
    assert [r["augmentation"] for r in rows[:6]] == ["original"] + ["rotation"] * 3 + ["noise"] * 2
    manifest = read_manifest(tmp_path / "a" / "manifest.csv")
    assert [r["file"] for r in manifest] == [r["file"] for r in rows]
    for r in manifest:  # sha256 matches the written file, every file listed exists
        assert sha256_file(tmp_path / "a" / r["file"]) == r["sha256"]
    # the original is copied unchanged, the affine (spacing) is kept on every copy
    assert manifest[0]["sha256"] == sha256_file(raw / "ct" / "sub001.nii.gz")
    for r in manifest:
        _, affine = load_volume(tmp_path / "a" / r["file"])
        assert np.allclose(np.diag(affine)[:3], SPACING)
    # one axis per rotation, angle recorded; same seed -> same bytes, other seed -> other copies
    rot = json.loads(manifest[1]["params"])
    assert sum(a != 0 for a in rot["angles_deg"]) == 1 and rot["interpolation"] == "linear"
    again = augment_folder(raw / "ct", tmp_path / "b", rotations=3, noise_copies=2, seed=5)
    assert [r["sha256"] for r in again] == [r["sha256"] for r in rows]
    other = augment_folder(raw / "ct", tmp_path / "c", rotations=3, noise_copies=2, seed=6)
    assert [r["sha256"] for r in other][1:6] != [r["sha256"] for r in rows][1:6]


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_noise_is_drawn_in_normalised_units_and_written_in_input_units(raw, tmp_path, modality):
    rows = augment_folder(raw / modality, tmp_path, rotations=0, noise_copies=6, seed=0)
    orig, _ = load_volume(raw / modality / "sub001.nii.gz")
    mod, lo, hi = intensity_range(orig)
    assert mod == modality  # auto-detection: air in HU means CT
    stds = set()
    for r in rows[1:7]:
        p = json.loads(r["params"])
        assert -0.1 <= p["mean"] <= 0.1 and p["std"] in (0.01, 0.05, 0.1)
        assert (p["unit_lo"], p["unit_hi"]) == pytest.approx((lo, hi), abs=1e-3)
        diff = (load_volume(tmp_path / r["file"])[0] - orig) / ((hi - lo) / 2)  # back to normalised units
        assert diff.mean() == pytest.approx(p["mean"], abs=0.01)
        assert diff.std() == pytest.approx(p["std"], rel=0.1)
        stds.add(p["std"])
    assert len(stds) > 1


def test_cli_writes_the_recipe(raw, tmp_path):
    out = tmp_path / "aug"
    cmd = [sys.executable, "-m", "mr2ct.augment", f"input={raw / 'mri'}", f"output={out}", "rotations=1", "noise_copies=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(read_manifest(out / "manifest.csv")) == 2 * 3
    assert sorted(p.name for p in out.glob("*.nii.gz"))[:3] == ["sub001.nii.gz", "sub001_noise00.nii.gz", "sub001_rot00.nii.gz"]
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run([*cmd, "seed=3"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 2 and "output exists" in again.stderr and {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    bad = subprocess.run([*cmd[:3], f"input={tmp_path / 'nope'}", f"output={tmp_path / 'x'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("mr2ct: error:") and "Traceback" not in bad.stderr
