"""Validation metrics and collapse monitor during training; `evaluate` on the phantom and on NIfTI folders."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import compose_train_cfg, run_cli, run_tool_here, tiny
from mr2ct.config import CONFIG_DIR
from mr2ct.data.phantom import make_phantom
from mr2ct.evaluate import evaluate
from mr2ct.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = compose_train_cfg([*tiny(), "trainer.limit_train_batches=2"], out)
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    return out, metrics


def test_training_validates_with_all_metrics_and_writes_niftis(trained):
    out, metrics = trained
    for key in ("val/mae", "val/psnr", "val/ssim", "val/dice", "val/diversity", "val/identifiability"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val/dice"] <= 1.0 and 0.0 <= metrics["val/identifiability"] <= 1.0
    written = sorted(p.relative_to(out).as_posix() for p in (out / "val_translations").rglob("*.nii.gz"))
    assert written == [
        "val_translations/epoch000/phantom_020000_sct.nii.gz",
        "val_translations/reference/phantom_020000_ct.nii.gz",
        "val_translations/reference/phantom_020000_mri_normalised.nii.gz",
    ]
    sct = nib.load(out / written[0])
    assert sct.shape == (24, 24, 32) and np.allclose(np.diag(sct.affine)[:3], 6.0)


def test_evaluate_cli_on_the_phantom_test_split(trained, tmp_path):
    out, _ = trained
    res = run_cli(["mr2ct.evaluate", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bone Dice" in res.stdout and "mode collapse: diversity" in res.stdout
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["case"] for r in rows] == ["phantom_030000"]
    assert set(rows[0]) == {"case", "mae", "psnr", "ssim", "dice", "dice_mri"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_cases"] == 1
    for name in ("mae", "psnr", "ssim", "dice"):  # the summary is the one case's row, not a placeholder
        assert summary["metrics"][name]["mean"] == pytest.approx(float(rows[0][name]), rel=1e-5, abs=1e-6), name
    assert summary["collapse"]["from_blocks"] and summary["collapse"]["n"] == 4.0  # one volume cut into Z-blocks


def test_evaluate_on_paired_nifti_folders_without_bone_masks(trained, tmp_path, monkeypatch):
    import mr2ct.inference

    heap = []
    monkeypatch.setattr(mr2ct.inference, "fixed_mmap_threshold", lambda: heap.append(1) or True)
    out, _ = trained
    for folder in ("mri", "ct"):
        (tmp_path / folder).mkdir()
    for seed in (1, 2):
        p = make_phantom((24, 24, 32), (6.0, 6.0, 6.0), seed=seed)
        nib.save(nib.Nifti1Image(p.mri, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "mri" / f"s{seed}.nii.gz")
        nib.save(nib.Nifti1Image(p.ct, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "ct" / f"s{seed}.nii.gz")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "data=nifti", f"data.test_a={tmp_path / 'mri'}", f"data.test_b={tmp_path / 'ct'}",
                       "save_predictions=true"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "eval")
        cfg.paths.output_dir = str(tmp_path / "eval")
    HydraConfig.instance().set_config(cfg)
    summary = evaluate(cfg)
    GlobalHydra.instance().clear()
    assert heap == [1]  # on CPU, as translate does (bounded_heap=true)
    assert summary["n_cases"] == 2 and set(summary["metrics"]) == {"mae", "psnr", "ssim", "dice", "dice_mri"}
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "eval" / "metrics.csv"))}
    # the figures are those of the written synthetic CT against the real CT (bone: segment(real CT), no masks given)
    from mr2ct.evaluation.metrics import case_metrics

    for case, row in rows.items():
        sct = torch.as_tensor(np.asarray(nib.load(tmp_path / "eval" / "predictions" / f"{case}_sct.nii.gz").dataobj, dtype=np.float32))
        ref = torch.as_tensor(np.asarray(nib.load(tmp_path / "ct" / f"{case}.nii.gz").dataobj, dtype=np.float32))
        again = case_metrics(sct, ref.clamp(-1024, 3000), None)
        assert abs(again["mae"] - float(row["mae"])) < 0.5 and abs(again["dice"] - float(row["dice"])) < 0.02, (case, again, row)
    for name in ("mae", "dice"):  # mean and population std over the two cases
        values = [float(r[name]) for r in rows.values()]
        assert summary["metrics"][name]["mean"] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6)
        assert summary["metrics"][name]["std"] == pytest.approx(np.std(values), rel=1e-4, abs=1e-6)
    assert summary["metrics"]["mae"]["std"] > 0


def test_evaluate_without_test_folders_refuses_instead_of_scoring_validation(trained, tmp_path, capsys):
    """data=nifti with validation folders only: the test split is empty, never the validation volumes."""
    out, _ = trained
    for folder in ("mri", "ct"):
        (tmp_path / folder).mkdir()
    p = make_phantom((24, 24, 32), (6.0, 6.0, 6.0), seed=1)
    nib.save(nib.Nifti1Image(p.mri, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "mri" / "s1.nii.gz")
    nib.save(nib.Nifti1Image(p.ct, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "ct" / "s1.nii.gz")
    ckpt = f"ckpt={out / 'checkpoints' / 'last.ckpt'}"
    folders = ["data=nifti", f"data.val_a={tmp_path / 'mri'}", f"data.val_b={tmp_path / 'ct'}"]
    res = run_tool_here(["mr2ct.evaluate", ckpt, *folders, f"hydra.run.dir={tmp_path / 'eval'}"], capsys)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("mr2ct: error:")]
    assert len(errors) == 1 and "no paired test data" in errors[0] and "data.test_a" in errors[0]
    assert not (tmp_path / "eval" / "metrics.csv").exists()
    res = run_tool_here(["mr2ct.evaluate", ckpt, *folders, "split=val", f"hydra.run.dir={tmp_path / 'eval_val'}"], capsys)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "s1" in (tmp_path / "eval_val" / "metrics.csv").read_text()
