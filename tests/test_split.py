"""Split by source subject: copies never cross sides; the NIfTI data module reads the split file."""

from __future__ import annotations

import shutil

import pytest
from hydra.utils import instantiate

from conftest import run_cli, run_tool_here
from mr2ct.data.augment import augment_folder, write_phantom_nifti
from mr2ct.data.splits import read_split
from mr2ct.data.splits import make_split, write_split

SHAPE, SPACING = (24, 24, 32), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 subjects with MRI, CT and bone; MRI and CT augmented (1 rotation, 1 noise copy)."""
    raw, root = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("ds")
    for mod in ("mri", "ct"):
        write_phantom_nifti(raw / mod, range(6), mod, SHAPE, SPACING)
        augment_folder(raw / mod, root / mod, rotations=1, noise_copies=1, seed=0)
    write_phantom_nifti(root / "bone", range(6), "bone", SHAPE, SPACING)
    return root


def _subject(path: str) -> str:
    return path.rsplit("/", 1)[-1][:6]


def test_split_keeps_subjects_on_one_side(dataset, tmp_path):
    split = make_split(dataset, bone="bone", test_fraction=0.34, val_fraction=0.17, seed=3)
    s = split["subjects"]
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (3, 1, 2)
    train = {_subject(p) for p in split["train_a"] + split["train_b"]}
    held = {_subject(r[k]) for part in ("val", "test") for r in split[part] for k in ("a", "b", "bone")}
    assert train == set(s["train"]) and held == set(s["val"]) | set(s["test"]) and not train & held
    assert len(split["train_a"]) == len(split["train_b"]) == 3 * 3  # original + 2 copies per subject
    assert all(r["name"] in s["test"] for r in split["test"])  # evaluation on originals only
    assert sorted(_subject(p) for p in split["excluded"]) == sorted(4 * list(s["val"] + s["test"]))
    # seeded: the same seed gives the same split, another seed (usually) another
    assert make_split(dataset, test_fraction=0.34, val_fraction=0.17, seed=3)["subjects"] == s
    # relative paths survive moving the whole folder
    path = write_split(split, dataset / "split.json")
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    back = read_split(moved / "split.json")
    assert back["test"][0]["a"].startswith(str(moved.resolve())) and back["subjects"] == split["subjects"]
    assert path.is_file()


def test_split_without_manifest_uses_the_filename_pattern(dataset, tmp_path):
    for mod in ("mri", "ct"):
        shutil.copytree(dataset / mod, tmp_path / mod, ignore=shutil.ignore_patterns("manifest.csv"))
    split = make_split(tmp_path, test_fraction=0.5, seed=0)
    train = {_subject(p) for p in split["train_a"]}
    assert len(train) == 3 and not train & set(split["subjects"]["test"])
    # a pattern that does not know the copies' suffixes would leak: each copy its own subject
    naive = make_split(tmp_path, pattern=r"^(.+)$", test_fraction=0.5, seed=0)
    assert len(naive["subjects"]["train"]) + len(naive["subjects"]["test"]) == 18
    with pytest.raises(ValueError, match="both"):
        shutil.rmtree(tmp_path / "ct")
        shutil.copytree(dataset / "ct", tmp_path / "ct")
        for p in (tmp_path / "ct").glob("sub00[0-4]*"):
            p.unlink()
        make_split(tmp_path, test_fraction=0.5, seed=0)


def test_nifti_datamodule_reads_the_split_file(dataset, train_cfg, tmp_path):
    path = write_split(make_split(dataset, bone="bone", test_fraction=0.34, val_fraction=0.17, seed=1), tmp_path / "s.json")
    cfg = train_cfg(["data=nifti", f"data.split_file={path}", "data.patch_size=[16,16,16]", "data.num_workers=0", "data.cache=none"])
    dm = instantiate(cfg.data)
    assert len(dm.records("train_a")) == 9 and {"image", "name"} <= set(dm.records("train_a")[0])
    assert [set(r) for r in dm.records("test")] == [{"a", "b", "bone", "name"}] * 2
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].shape == batch["b"].shape == (2, 1, 16, 16, 16)
    val = next(iter(dm.val_dataloader()))
    assert val["a"].shape == (1, 1, *SHAPE) and float(val["b"].min()) >= -1.0


def test_cli_writes_a_split_file(dataset, tmp_path, capsys):
    args = [f"input={dataset}", "test_fraction=0.34", "val_fraction=0", f"output={tmp_path / 'split.json'}"]
    res = run_cli(["mr2ct.split", *args])
    assert res.returncode == 0, res.stderr
    assert "data.split_file=" in res.stdout and len(read_split(tmp_path / "split.json")["test"]) == 2
    before = (tmp_path / "split.json").read_bytes()
    again = run_tool_here(["mr2ct.split", *args, "seed=5"], capsys)  # an existing split file is never replaced silently
    assert again.returncode == 2 and "output exists" in again.stderr and (tmp_path / "split.json").read_bytes() == before
    bad = run_tool_here(["mr2ct.split", f"input={dataset}", "test_fraction=0.99"], capsys)
    assert bad.returncode == 2 and bad.stderr.startswith("mr2ct: error:")
    old = run_tool_here(["mr2ct.split", f"in={dataset}"], capsys)  # the key of earlier versions names its successor
    assert old.returncode == 2 and old.stderr.strip() == f"mr2ct: error: in= is now input= (the same key in every tool): input={dataset}"
