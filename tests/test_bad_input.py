"""Bad input gets one clear line naming what is wrong, a non-zero exit, no traceback, nothing written.

Table-driven: each case builds its input in a temporary folder and runs the real Hydra entry point
(in-process for speed; three cases also as real subprocesses to prove there is no traceback wall).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import TINY_GENERATOR, compose_train_cfg, run_cli, run_tool_here, tiny

GEN = TINY_GENERATOR["unet"]
SHAPE = (24, 24, 32)


def nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return path


def ct(shape=SHAPE) -> np.ndarray:
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[4:-4, 4:-4, :] = 40.0
    return vol


def data_dirs(tmp: Path) -> tuple[Path, Path]:
    """Good MRI and CT folders (two volumes each); a case drops its bad file into one of them."""
    mri, cts = tmp / "mri", tmp / "ct"
    rng = np.random.default_rng(0)
    for i in range(2):
        nifti(mri / f"s{i}.nii.gz", rng.random(SHAPE) * 500)
        nifti(cts / f"s{i}.nii.gz", ct())
    return mri, cts


def train_args(tmp: Path) -> list[str]:
    mri, cts = data_dirs(tmp)
    return [
        "data=nifti", f"data.train_a={mri}", f"data.train_b={cts}", "data.patch_size=[16,16,16]", "data.batch_size=1",
        "data.num_workers=0", "discriminator.ndf=4", "discriminator.n_layers=2", "model.n_epochs=1", "model.n_epochs_decay=0",
        *GEN, f"hydra.run.dir={tmp / 'run'}",
    ]


def truncated(path: Path) -> None:
    nifti(path, np.random.default_rng(1).random(SHAPE) * 500)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def nan_mri(path: Path) -> Path:
    return nifti(path, np.where(np.arange(24 * 24 * 32).reshape(SHAPE) == 7, np.nan, np.ones(SHAPE)))


def dicom(folder: Path, **damage) -> Path:
    """A DICOM series of SHAPE (as a scanner writes it), optionally with a missing or shifted slice."""
    from test_formats import write_dicom_series

    write_dicom_series(folder, np.random.default_rng(2).integers(0, 500, SHAPE).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), **damage)
    return folder


def two_series(folder: Path) -> Path:
    dicom(folder, series_uid="1.2.9.1")
    for p in folder.iterdir():
        p.rename(p.with_name("a_" + p.name))
    return dicom(folder, series_uid="1.2.9.2")


def tool(module: str, t: Path, inp: Path, out: str = "out.nii.gz", ckpt: bool = True) -> tuple[str, list[str]]:
    """translate (with a checkpoint) or segment of ``inp`` into ``t/out``."""
    args = [f"input={inp}", f"output={t / out}", f"hydra.run.dir={t / 'run'}"]
    return module, ([f"ckpt={small_checkpoint(t)}"] if ckpt and module == "translate" else []) + args


def evaluate_case(t: Path, bad: Callable[[Path], Path]) -> tuple[str, list[str]]:
    """evaluate on NIfTI test folders whose MRI folder holds one bad file beside a good pair."""
    mri, cts = data_dirs(t)
    bad(mri / "s9.nii.gz")
    nifti(cts / "s9.nii.gz", ct())
    return "evaluate", [f"ckpt={small_checkpoint(t)}", "data=nifti", f"data.test_a={mri}", f"data.test_b={cts}", f"hydra.run.dir={t / 'run'}"]


def small_checkpoint(tmp: Path, channels: str = "[4,8,16]") -> Path:
    """A checkpoint as train writes it (weights + mr2ct_config), built without training."""
    cfg = compose_train_cfg([*tiny(), f"generator.channels={channels}"], tmp / "ckrun")
    model = instantiate(cfg.model, _convert_="partial")
    from omegaconf import OmegaConf

    run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("generator", "data", "model")}
    path = tmp / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "mr2ct_config": run_config, "epoch": 0, "global_step": 0}, path)
    GlobalHydra.instance().clear()
    return path


class Evil:
    """Unpickling this writes a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def malicious_checkpoint(tmp: Path) -> Path:
    path = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil(tmp / "PWNED")}, path)
    return path


def run_main(module: str, args: list[str], capsys) -> tuple[int, str]:
    """Call the Hydra entry point ``mr2ct.<module>.main`` in-process like the CLI does; (exit code, stderr)."""
    import importlib

    main = importlib.import_module(f"mr2ct.{module}").main
    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = [f"{module}.py", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def case_train(setup: Callable[[Path, list[str]], list[str]]):
    return lambda tmp: ("train", setup(tmp, train_args(tmp)))


CASES = {
    "training pairs, MRI without CT": (
        case_train(lambda t, a: [*a, f"data.train_pairs_a={t / 'mri'}", f"data.train_pairs_b={nifti(t / 'pct' / 's0.nii.gz', ct()).parent}", "loss=+paired"]),
        "train_pairs: no CT in",
    ),
    "training pairs, CT without MRI": (
        case_train(lambda t, a: [*a, f"data.train_pairs_a={nifti(t / 'pmri' / 's1.nii.gz', np.ones(SHAPE)).parent}", f"data.train_pairs_b={t / 'ct'}", "loss=+paired"]),
        "train_pairs: no MRI in",
    ),
    "paired loss without pairs": (case_train(lambda t, a: [*a, "loss=+paired"]), "loss=+paired needs registered training pairs"),
    "missing data folder": (case_train(lambda t, a: [*a, f"data.train_a={t / 'nope'}"]), "data folder does not exist"),
    "empty data folder": (case_train(lambda t, a: [*a, f"data.train_a={(t / 'empty').mkdir() or t / 'empty'}"]), "no volumes in data folder"),
    "not NIfTI": (case_train(lambda t, a: (t / "mri" / "notes.nii.gz").write_text("hello") and a), "notes.nii.gz: not a readable NIfTI file"),
    "truncated NIfTI": (case_train(lambda t, a: truncated(t / "mri" / "cut.nii.gz") or a), "cut.nii.gz: not a readable NIfTI file"),
    "2D image": (case_train(lambda t, a: nifti(t / "mri" / "flat.nii.gz", np.ones((24, 24))) and a), "flat.nii.gz: expected a 3-D volume, got shape [24, 24] (2-D)"),
    "4D image": (case_train(lambda t, a: nifti(t / "ct" / "series.nii.gz", np.ones((*SHAPE, 3))) and a), "series.nii.gz: expected a 3-D volume, got shape [24, 24, 32, 3] (4-D)"),
    "NaN voxels": (case_train(lambda t, a: nifti(t / "ct" / "nan.nii.gz", np.where(np.arange(24 * 24 * 32).reshape(SHAPE) == 7, np.nan, ct())) and a), "nan.nii.gz: 1 voxels are NaN or infinite"),
    "Inf voxels": (case_train(lambda t, a: nifti(t / "mri" / "inf.nii.gz", np.full(SHAPE, np.inf)) and a), "inf.nii.gz: 18432 voxels are NaN or infinite"),
    "smaller than patch": (case_train(lambda t, a: nifti(t / "mri" / "tiny.nii.gz", np.ones((24, 3, 32))) and a), "tiny.nii.gz: volume [24, 3, 32] is too small for patch [16, 16, 16]"),
    "size-1 axis": (case_train(lambda t, a: nifti(t / "mri" / "slab.nii.gz", np.ones((24, 24, 1))) and a), "slab.nii.gz: degenerate volume of shape [24, 24, 1]"),
    "patch not divisible by stride": (case_train(lambda t, a: [*a, "data.patch_size=[18,16,16]"]), "must be divisible by the generator's total stride 4"),
    "negative loss weight": (case_train(lambda t, a: [*a, "loss.cycle.weight=-1"]), "loss.cycle.weight must be >= 0"),
    "negative bone weight of the paired term": (case_train(lambda t, a: [*a, "loss=+paired", "loss.paired.bone_weight=-1"]), "loss.paired.bone_weight must be >= 0"),
    "loss set without the cycle": (case_train(lambda t, a: [*a, "loss=[adversarial]"]), "the loss set needs ['cycle']"),
    "resume checkpoint missing": (case_train(lambda t, a: [*a, f"ckpt={t / 'none.ckpt'}"]), "checkpoint not found"),
    "resume checkpoint corrupt": (case_train(lambda t, a: (t / "bad.ckpt").write_bytes(b"\x00" * 100) and [*a, f"ckpt={t / 'bad.ckpt'}"]), "bad.ckpt is corrupt or truncated"),
    "resume checkpoint of another architecture": (
        case_train(lambda t, a: [*a, f"ckpt={small_checkpoint(t, '[8,8,16]')}"]),
        "model.ckpt belongs to another model architecture: g_ab.",
    ),
    "resume malicious checkpoint": (case_train(lambda t, a: [*a, f"ckpt={malicious_checkpoint(t)}"]), "refusing to load checkpoint"),
    "translate checkpoint missing": (
        lambda t: ("translate", [f"ckpt={t / 'none.ckpt'}", f"input={nifti(t / 'in.nii.gz', np.ones(SHAPE))}", f"output={t / 'out.nii.gz'}", f"hydra.run.dir={t / 'run'}"]),
        "checkpoint not found",
    ),
    "translate corrupt checkpoint": (
        lambda t: ((t / "bad.ckpt").write_bytes(b"PK\x03\x04junk") and "translate", [f"ckpt={t / 'bad.ckpt'}", f"input={nifti(t / 'in.nii.gz', np.ones(SHAPE))}", f"output={t / 'out.nii.gz'}", f"hydra.run.dir={t / 'run'}"]),
        "bad.ckpt is corrupt or truncated",
    ),
    "translate malicious checkpoint": (
        lambda t: ("translate", [f"ckpt={malicious_checkpoint(t)}", f"input={nifti(t / 'in.nii.gz', np.ones(SHAPE))}", f"output={t / 'out.nii.gz'}", f"hydra.run.dir={t / 'run'}"]),
        "refusing to load checkpoint",
    ),
    "DICOM series with a missing slice": (case_train(lambda t, a: dicom(t / "mri" / "dcm", skip=5) and a), "dcm: missing slice in series"),
    "DICOM series with uneven spacing": (case_train(lambda t, a: dicom(t / "ct" / "dcm", shift_slice=5) and a), "dcm: uneven slice spacing in series"),
    "translate NaN voxel": (lambda t: tool("translate", t, nan_mri(t / "in.nii.gz")), "in.nii.gz: 1 voxels are NaN or infinite"),
    "translate truncated input": (lambda t: tool("translate", t, truncated(t / "cut.nii.gz") or t / "cut.nii.gz"), "cut.nii.gz: not a readable NIfTI file"),
    "translate unknown input type": (lambda t: ((t / "in.txt").write_text("x") and None) or tool("translate", t, t / "in.txt"), "in.txt: unknown file type"),
    "translate unknown output type": (lambda t: tool("translate", t, nifti(t / "in.nii.gz", np.ones(SHAPE)), out="sct.png"), "sct.png: unknown output type"),
    "translate two DICOM series into one file": (lambda t: tool("translate", t, two_series(t / "study")), "holds several volumes, so output must be a folder"),
    "segment NaN voxel": (lambda t: tool("segment", t, nan_mri(t / "in.nii.gz")), "in.nii.gz: 1 voxels are NaN or infinite"),
    "segment truncated input": (lambda t: tool("segment", t, truncated(t / "cut.nii.gz") or t / "cut.nii.gz"), "cut.nii.gz: not a readable NIfTI file"),
    "segment unknown input type": (lambda t: ((t / "in.txt").write_text("x") and None) or tool("segment", t, t / "in.txt"), "in.txt: unknown file type"),
    "segment unknown output type": (lambda t: tool("segment", t, nifti(t / "in.nii.gz", ct()), out="bone.png"), "bone.png: unknown output type"),
    "segment two DICOM series where one is expected": (lambda t: tool("segment", t, two_series(t / "study")), "holds 2 DICOM series where one volume is expected"),
    "evaluate NaN voxel": (lambda t: evaluate_case(t, nan_mri), "s9.nii.gz: 1 voxels are NaN or infinite"),
    "evaluate truncated input": (lambda t: evaluate_case(t, truncated), "s9.nii.gz: not a readable NIfTI file"),
    "evaluate folder with no volume of a known type": (
        lambda t: ((t / "tm").mkdir() or (t / "tm" / "s0.txt").write_text("x") and None)
        or ("evaluate", [f"ckpt={small_checkpoint(t)}", "data=nifti", f"data.test_a={t / 'tm'}", f"data.test_b={data_dirs(t)[1]}", f"hydra.run.dir={t / 'run'}"]),
        "no volumes in data folder",
    ),
    "augment NaN voxel": (lambda t: ("augment", [f"input={nan_mri(t / 'raw' / 'in.nii.gz').parent}", f"output={t / 'aug'}"]), "in.nii.gz: 1 voxels are NaN or infinite"),
    "leakcheck NaN voxel": (lambda t: ("leakcheck", [f"train={nan_mri(t / 'tr' / 'in.nii.gz').parent}", f"test={nifti(t / 'te' / 'x.nii.gz', np.ones(SHAPE)).parent}"]), "in.nii.gz: 1 voxels are NaN or infinite"),
    "translate output exists": (
        lambda t: ("translate", [f"ckpt={small_checkpoint(t)}", f"input={nifti(t / 'in.nii.gz', np.ones(SHAPE))}", f"output={nifti(t / 'out.nii.gz', np.zeros(SHAPE))}", f"hydra.run.dir={t / 'run'}"]),
        "output exists",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_error(name, tmp_path, capsys):
    build, expected = CASES[name]
    module, args = build(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run_main(module, args, capsys)
    assert code == 2, (code, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("mr2ct: error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()  # the malicious pickle never ran
    if module == "train":  # translate's Hydra log folder may stay; its outputs are checked below
        assert not (tmp_path / "run").exists(), "a failed start left a run folder behind"
    assert not (tmp_path / "out.nii.gz").exists() or "output exists" in name
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and not {"ckrun", "run"} & set(p.parts)}
    assert after == {p: t for p, t in before.items() if not {"ckrun", "run"} & set(p.parts)}  # nothing written or overwritten


@pytest.mark.parametrize("low,high", [(0, 3000), (-1000, -990)], ids=["no-air", "flat"])
def test_ct_not_in_hounsfield_units_warns(tmp_path, low, high):
    """Either sign alone warns: no air below -500 (a CT scaled to [0, 3000]), or under 20 units of range."""
    from mr2ct.data.checks import CheckVolumed, LoadVolumed

    values = low + (high - low) * np.random.default_rng(0).random(SHAPE)
    path = nifti(tmp_path / "ct01.nii.gz", values)
    load = LoadVolumed(["b"])
    with pytest.warns(UserWarning, match=r"ct01.nii.gz: CT values range \[.*\]: not Hounsfield units"):
        CheckVolumed(["b"], (16, 16, 16))(load({"b": str(path)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckVolumed(["b"], (16, 16, 16))(load({"b": str(nifti(tmp_path / "ok.nii.gz", ct()))}))


def test_cli_errors_have_no_traceback(tmp_path):
    """The real processes: a corrupt data file, a malicious checkpoint."""
    args = train_args(tmp_path)
    truncated(tmp_path / "mri" / "cut.nii.gz")
    res = run_cli(["mr2ct.train", *args])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("mr2ct: error: ") and "cut.nii.gz" in res.stderr
    assert not (tmp_path / "run").exists()

    res = run_cli(["mr2ct.translate", f"ckpt={malicious_checkpoint(tmp_path)}", f"input={tmp_path / 'mri' / 's0.nii.gz'}",
                   f"output={tmp_path / 'o.nii.gz'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr and "refusing to load checkpoint" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize(
    "tool,arg,expected",
    [
        ("train", "data.no_such_option=1", "unknown key 'data.no_such_option'"),
        ("train", "generator=unet3", "Could not find 'generator/unet3' (options: resnet3d_2blk, resnet3d_9blk, unet, unet_updated)"),
        ("train", "data.patch_size=[16,16", "cannot parse 'data.patch_size=[16,16'"),
        ("train", "data.augment.noise_domains=[mri,pet]", "data.augment.noise_domains takes mri and/or ct, got ['pet']"),
        ("train", "data.patches_per_epoch=0", "data.patches_per_epoch must be >= 1 or null, got 0"),
        ("train", "data.augment.rotation_mode=cubic", "data.augment.rotation_mode must be bilinear or nearest, got 'cubic'"),
        ("evaluate", "out_dir=x", "unknown key 'out_dir'"),
    ],
)
def test_bad_config_override_gets_one_line(tool, arg, expected, tmp_path, capsys):
    """Through the real entry (``mr2ct.cli.run_tool``): Hydra's multi-line report becomes one line, exit 2, no run folder."""
    args = train_args(tmp_path) if tool == "train" else ["ckpt=x.ckpt", f"hydra.run.dir={tmp_path / 'run'}"]
    res = run_tool_here([f"mr2ct.{tool}", *args, arg], capsys)
    err = res.stderr
    assert res.returncode == 2, err[-2000:]
    assert err.strip().splitlines() == [f"mr2ct: error: {err.strip().split('mr2ct: error: ')[-1]}"] and expected in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_full_disk_stops_training_with_one_line(tmp_path, capsys, monkeypatch):
    """A checkpoint that does not fit on the disk: one line naming it, exit 2, no partial file left."""
    import errno
    import os

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, err = run_main("train", [*train_args(tmp_path), "multistart.starts=1"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("mr2ct: error:")]
    assert code == 2 and len(lines) == 1 and "the disk is full" in lines[0] and "Traceback" not in err, err[-2000:]
    assert not [p for p in (tmp_path / "run").rglob("*.ckpt*")]
