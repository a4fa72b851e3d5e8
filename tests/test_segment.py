"""Otsu / multi-Otsu thresholds, body mask, bone segmentation on a volume with known bone, the CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mr2ct.config import CONFIG_DIR
from mr2ct.evaluation.segmentation import body_mask, multiotsu_thresholds, otsu_threshold, segment_bone
from mr2ct.segment import run


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_otsu_and_multiotsu_split_known_modes():
    rng = np.random.default_rng(0)
    low, mid, high = rng.normal(0, 1, 500), rng.normal(50, 1, 300), rng.normal(100, 1, 200)
    t = otsu_threshold(np.r_[low, high])  # any threshold in the gap separates: voxels > t are bright
    assert low.max() <= t < high.min()
    t1, t2 = multiotsu_thresholds(np.r_[low, mid, high], 3)
    assert low.max() <= t1 < mid.min() and mid.max() <= t2 < high.min()
    assert multiotsu_thresholds(np.full(10, 7.0), 4) == [7.0, 7.0, 7.0]


@pytest.fixture
def chest():
    """A body (0 HU) with two lungs (-800 HU) and a spine-like bone cylinder (1000 HU), in air."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in (40, 40, 24)), indexing="ij")
    vol = np.full((40, 40, 24), -1000.0, np.float32)
    body = ((x - 20) / 17.0) ** 2 + ((y - 20) / 14.0) ** 2 <= 1
    vol[body] = 0.0
    lungs = ((((x - 12) / 6.0) ** 2 + ((y - 21) / 8.0) ** 2) <= 1) | ((((x - 28) / 6.0) ** 2 + ((y - 21) / 8.0) ** 2) <= 1)
    vol[lungs] = -800.0
    bone = ((x - 20) ** 2 + (y - 10) ** 2 <= 9) & body
    vol[bone] = 1000.0
    vol += np.random.default_rng(0).normal(0, 20, vol.shape).astype(np.float32)
    return vol, bone, body


def test_body_mask_fills_lungs(chest):
    vol, _, body = chest
    assert np.array_equal(body_mask(vol), body)


def test_multiotsu_finds_bone_where_two_class_otsu_finds_air(chest):
    vol, bone, _ = chest
    assert dice(segment_bone(vol, "multiotsu", 4), bone) > 0.95
    # the fact behind the default: with lungs in the body, two classes split air from tissue
    assert dice(segment_bone(vol, "otsu"), bone) < 0.3


def test_min_size_removes_specks(chest):
    vol, bone, _ = chest
    vol = vol.copy()
    vol[30, 25, 5] = 1500.0  # one isolated bright voxel inside the body
    assert segment_bone(vol)[30, 25, 5]
    cleaned = segment_bone(vol, min_size=10)
    assert not cleaned[30, 25, 5] and dice(cleaned, bone) > 0.95


def _cfg(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("segment", overrides=overrides)


def test_segment_entry_writes_uint8_mask_with_affine_and_refuses_overwrite(chest, tmp_path):
    vol, bone, _ = chest
    affine = np.array([[0.0, -1.5, 0, 30], [2.0, 0, 0, -12], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    src, dst = tmp_path / "sct.nii.gz", tmp_path / "bone.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), src)
    run(_cfg([f"input={src}", f"output={dst}"]))
    out = nib.load(dst)
    assert out.get_data_dtype() == np.uint8
    assert np.array_equal(out.affine, nib.load(src).affine)
    assert dice(np.asarray(out.dataobj) > 0, bone) > 0.95
    stamp = dst.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(_cfg([f"input={src}", f"output={dst}"]))
    assert dst.stat().st_mtime_ns == stamp
    run(_cfg([f"input={src}", f"output={dst}", "overwrite=true", "bone.method=otsu"]))
    # overwritten, and with the method asked for: two-class Otsu's mask, not the default's
    rewritten = np.asarray(nib.load(dst).dataobj) > 0
    assert np.array_equal(rewritten, segment_bone(vol, "otsu")) and dice(rewritten, bone) < 0.3
    GlobalHydra.instance().clear()
