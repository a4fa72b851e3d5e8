"""Evaluate a checkpoint on paired test data: ``python -m mr2ct.evaluate ckpt=RUN/checkpoints/last.ckpt``.

Examples::

    python -m mr2ct.evaluate ckpt=...                      # the run's own data config, test split (phantom: 4 volumes)
    python -m mr2ct.evaluate ckpt=... split=val
    python -m mr2ct.evaluate ckpt=... data=nifti data.test_a=/data/test/mri data.test_b=/data/test/ct \
        data.test_bone=/data/test/bone                      # bone masks optional: else segment(real CT)

Per case: MAE / PSNR / SSIM (SynthRAD2023 protocol, :mod:`mr2ct.evaluation.metrics`), bone Dice of the segmented
synthetic CT and of the same segmentation applied to the MRI (the baseline the translation must beat);
over the set: mean ± std and the mode-collapse diagnostics. Writes ``metrics.csv`` and ``summary.json``
in the run folder and prints a table.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mr2ct.checkpoints import load_generator
from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.data.transforms import unit_to_hu
from mr2ct.evaluation.collapse import collapse_diagnostics, collapse_warnings, split_for_collapse, thumbnail
from mr2ct.evaluation.metrics import case_metrics
from mr2ct.evaluation.pictures import case_figure, summary_figure
from mr2ct.evaluation.segmentation import segment_bone, segment_params
from mr2ct.formats import write_volume
from mr2ct.inference import bound_cpu_heap, inference_numerics, place_generator, resolve_device, translate_volume

log = logging.getLogger("mr2ct.evaluate")

COLUMNS = ("mae", "psnr", "ssim", "dice", "dice_mri")
HEADERS = {"mae": "MAE HU", "psnr": "PSNR dB", "ssim": "SSIM", "dice": "bone Dice", "dice_mri": "Dice MRI"}


def data_config(cfg: DictConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """The data module config: ``cfg.data`` if given, else the run's own; preprocessing from the run."""
    run_data = dict(run_config.get("data", {}))
    if cfg.get("data"):
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
        # evaluation reads only the paired split: the unpaired training folders may stay unset
        for key in ("train_a", "train_b"):
            if data.get(key) == "???":
                data[key] = ""
        if "Nifti" in str(run_data.get("_target_", "")) and "Nifti" in str(data.get("_target_", "")):
            data.update({k: run_data[k] for k in ("orientation", "spacing") if k in run_data})
    else:
        data = run_data
    # the network saw intensities normalised exactly as in training
    data.update({k: run_data[k] for k in ("ct_window", "mri_percentiles") if k in run_data})
    data["num_workers"] = 0
    return data


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and (population) std of every metric column over the cases."""
    out = {}
    for col in COLUMNS:
        vals = [r[col] for r in rows if col in r and r[col] is not None and not math.isnan(r[col])]
        if vals:
            out[col] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out


def format_table(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]]) -> str:
    cols = [c for c in COLUMNS if c in summary]
    name_w = max(8, *(len(r["case"]) for r in rows))
    fmt = {"mae": "{:.1f}", "psnr": "{:.2f}", "ssim": "{:.4f}", "dice": "{:.3f}", "dice_mri": "{:.3f}"}
    lines = [f"{'case':<{name_w}}  " + "  ".join(f"{HEADERS[c]:>15}" for c in cols)]
    for r in rows:
        lines.append(f"{r['case']:<{name_w}}  " + "  ".join(f"{fmt[c].format(r[c]):>15}" for c in cols))
    ms = "  ".join(f"{(fmt[c] + ' ± ' + fmt[c]).format(summary[c]['mean'], summary[c]['std']):>15}" for c in cols)
    lines.append(f"{'mean ± sd':<{name_w}}  {ms}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Translate and score every case of the paired split; returns the summary (also written to disk)."""
    out_dir = Path(cfg.paths.output_dir)
    device = resolve_device(str(cfg.device))
    bound_cpu_heap(device, cfg.get("bounded_heap", True))
    generator, run_config = load_generator(cfg.ckpt, "a2b")
    precision, memory_format = inference_numerics(device, str(cfg.precision), str(cfg.memory_format), cfg.ckpt)
    generator = place_generator(generator, device, memory_format)
    data = data_config(cfg, run_config)
    window = [float(w) for w in data.get("ct_window", (-1024.0, 3000.0))]
    inference = dict(run_config.get("model", {}).get("inference", {}))
    roi = list(cfg.roi_size) if cfg.roi_size else list(inference.get("roi_size") or data["patch_size"])
    datamodule = hydra.utils.instantiate(data)
    split = str(cfg.split)
    if split not in ("val", "test"):
        raise ValueError(f"split must be val or test, got {split!r}")
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    if not len(loader):
        raise FileNotFoundError(f"no paired {split} data (NIfTI: set data.{split}_a and data.{split}_b)")
    params = segment_params(cfg.bone)

    rows, thumbs_in, thumbs_out, pictures = [], [], [], []
    for i, batch in enumerate(tqdm(loader, desc="cases", unit="case", disable=not sys.stderr.isatty())):
        t0 = time.perf_counter()
        real_a = torch.as_tensor(batch["a"]).float()
        real_b = torch.as_tensor(batch["b"]).float()
        fake_b = translate_volume(
            generator, real_a, roi, overlap=float(cfg.overlap), sw_batch_size=cfg.sw_batch_size, mode=str(cfg.mode), sw_device=device, device="cpu",
            precision=precision, memory_format=memory_format,
        )
        pred_hu, ref_hu = unit_to_hu(fake_b[0, 0], window), unit_to_hu(real_b[0, 0], window)
        bone = torch.as_tensor(batch["bone"])[0, 0] > 0.5 if "bone" in batch else None
        row = {"case": str(batch["name"][0]) if "name" in batch else f"case_{i:03d}"}
        row.update(case_metrics(pred_hu, ref_hu, bone, mri=real_a[0, 0], segment=params))
        rows.append(row)
        if cfg.get("pictures", True):
            ref_bone = bone.numpy() if bone is not None else segment_bone(ref_hu.numpy(), **params)
            pictures.append(case_figure(
                out_dir / "pictures" / f"{row['case']}.png", real_a[0, 0].numpy(), pred_hu.numpy(), ref_hu.numpy(),
                ref_bone, segment_bone(pred_hu.numpy(), **params),
                title=f"{row['case']}: bone Dice {row['dice']:.3f}, MAE {row['mae']:.0f} HU",
            ))
        thumbs_in.append(thumbnail(real_a[0, 0], int(cfg.collapse.max_side)))
        thumbs_out.append(thumbnail(fake_b[0, 0], int(cfg.collapse.max_side)))
        if cfg.save_predictions:
            affine = batch["a"].affine[0].numpy() if hasattr(batch["a"], "affine") else np.eye(4)
            write_volume(pred_hu.numpy(), affine, out_dir / "predictions" / f"{row['case']}_sct.nii.gz", dtype="int16", overwrite=True)
        log.info("%s: %s (%.1f s)", row["case"], {k: round(v, 4) for k, v in row.items() if k != "case"}, time.perf_counter() - t0)

    summary: dict[str, Any] = {"ckpt": str(cfg.ckpt), "split": split, "n_cases": len(rows), "roi_size": roi,
                               "numerics": {"precision": precision, "memory_format": memory_format}}
    summary["metrics"] = summarise(rows)
    xs, ys = split_for_collapse(thumbs_in, thumbs_out, min_n=4)
    diag = collapse_diagnostics(xs, ys)
    warnings = collapse_warnings(diag, float(cfg.collapse.min_diversity), float(cfg.collapse.min_identifiability))
    summary["collapse"] = {**diag, "from_blocks": len(xs) != len(rows), "warnings": warnings, "collapsed": bool(warnings)}
    summary["segment"] = params

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", *[c for c in COLUMNS if c in rows[0]]])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print(format_table(rows, summary["metrics"]))
    blocks = f" (over {len(xs)} Z-blocks of {len(rows)} volumes)" if summary["collapse"]["from_blocks"] else ""
    print(f"mode collapse: diversity {diag['diversity']:.3f}, identifiability {diag['identifiability']:.2f}{blocks}")
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"written: {out_dir / 'metrics.csv'}, {out_dir / 'summary.json'}", flush=True)
    if pictures:
        pictures.append(summary_figure(out_dir / "pictures" / "summary.png", rows))
        print(f"pictures: {out_dir / 'pictures'}/ ({len(pictures) - 1} cases: MRI, synthetic CT, CT, |difference|, bone outlines; summary.png)", flush=True)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, ValueError):
        evaluate(cfg)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("evaluate")
