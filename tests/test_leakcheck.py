"""Leak detector: flags every copy augment.py makes, no distinct phantom subject; exit codes; training guard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli, run_tool_here, tiny
from mr2ct.data.augment import augment_folder, write_phantom_nifti
from mr2ct.data.leaks import LeakError, Settings, score_matrix
from mr2ct.data.manifest import subject_id
from mr2ct.data.splits import make_split, write_split
from mr2ct.formats import list_volumes, volume_stem
from mr2ct.train import train

SHAPE, SPACING = (32, 32, 40), (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """4 test subjects augmented with the full recipe (4 x 21 files) and 4 other subjects, MRI and CT.

    (The README reports the larger measurement: 8 + 8 subjects, MRI and CT, 48 x 48 x 64.)
    """
    root = tmp_path_factory.mktemp("leak")
    for folder, modality in ((root, "mri"), (root / "ct", "ct")):  # MRI at the top (the CLI tests use it), CT below
        write_phantom_nifti(folder / "test", range(4), modality, SHAPE, SPACING)
        augment_folder(folder / "test", folder / "copies", rotations=10, noise_copies=10, seed=0)
        write_phantom_nifti(folder / "others", range(100, 104), modality, SHAPE, SPACING)
    return root


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_recall_and_false_positive_rate_on_phantoms(phantoms, modality):
    root = phantoms if modality == "mri" else phantoms / "ct"
    test = list_volumes(root / "test")
    train = list_volumes(root / "copies") + list_volumes(root / "others")
    scores, _ = score_matrix(train, test, Settings())
    copy = np.array([[subject_id(volume_stem(a)) == volume_stem(b) for b in test] for a in train])
    flagged = scores >= Settings().threshold
    assert copy.sum() == 4 * 21
    assert flagged[copy].all(), f"recall {flagged[copy].mean():.3f}, lowest copy score {scores[copy].min():.3f}"
    assert not flagged[~copy].any(), f"FPR {flagged[~copy].mean():.4f}, highest other score {scores[~copy].max():.3f}"


def test_cli_exit_codes(phantoms, tmp_path, capsys):
    shutil.copytree(phantoms / "others", tmp_path / "train")
    clean = run_tool_here(["mr2ct.leakcheck", f"train={tmp_path / 'train'}", f"test={phantoms / 'test'}"], capsys)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    shutil.copy(phantoms / "copies" / "sub003_rot07.nii.gz", tmp_path / "train")
    leaky = run_cli(["mr2ct.leakcheck", f"train={tmp_path / 'train'}", f"test={phantoms / 'test'}"])
    assert leaky.returncode == 1
    assert "sub003_rot07.nii.gz" in leaky.stdout and "sub003.nii.gz" in leaky.stdout and leaky.stdout.count("  ~  test ") == 1


def test_augment_split_leakcheck_train_end_to_end(tmp_path, train_cfg):
    """The documented pipeline on NIfTI phantoms; a copy of a test subject slipped into training stops it."""
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    for mod in ("mri", "ct"):
        write_phantom_nifti(raw / mod, range(5), mod, (24, 24, 32), (6.0, 6.0, 6.0))
        augment_folder(raw / mod, ds / mod, rotations=2, noise_copies=1, seed=0)
    split_path = write_split(make_split(ds, test_fraction=0.2, val_fraction=0.2, seed=0), ds / "split.json")
    guard_on = ["data=nifti", f"data.split_file={split_path}", "data.leakcheck=true", "data.num_workers=0", *tiny("unet")]
    guard_on = [o for o in guard_on if not o.startswith(("data.shape", "data.spacing", "data.n_"))]
    metrics = train(train_cfg([*guard_on, "trainer.limit_train_batches=2"]))
    assert np.isfinite(metrics["val/mae"])

    split = json.loads(split_path.read_text())
    test_subject = split["subjects"]["test"][0]
    split["train_a"].append(f"mri/{test_subject}_rot01.nii.gz")  # one augmented copy of a test subject
    leaky = ds / "leaky.json"
    leaky.write_text(json.dumps(split))
    guard_on[1] = f"data.split_file={leaky}"
    with pytest.raises(LeakError, match=f"{test_subject}_rot01"):
        train(train_cfg(guard_on))

    # validation against test: an augmented copy of a validation subject listed as a test case
    split = json.loads(split_path.read_text())
    val_subject = split["subjects"]["val"][0]
    copy = f"{val_subject}_rot01.nii.gz"
    split["test"].append({"a": f"mri/{copy}", "b": f"ct/{copy}", "name": f"{val_subject}_rot01"})
    leaky.write_text(json.dumps(split))
    with pytest.raises(LeakError, match=f"{val_subject}_rot01"):
        train(train_cfg(guard_on))
