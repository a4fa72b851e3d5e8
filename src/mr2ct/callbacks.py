"""Lightning callbacks: slice images for TensorBoard, wall-time bookkeeping."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor


def orthogonal_slices(volume: Tensor) -> list[Tensor]:
    """The three mid-slices of ``volume`` (X, Y, Z): sagittal (Y, Z), coronal (X, Z), axial (X, Y)."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[x], volume[:, y], volume[:, :, z]]


def slice_grid(volumes: list[Tensor]) -> Tensor:
    """One (H, W) image in [0, 1]: a row per volume (values in [-1, 1]), its three mid-slices side by side.

    Slices are transposed so the superior direction (Z) points up, then padded to a common size.
    """
    rows = []
    for vol in volumes:
        slices = [s.t().flip(0) for s in orthogonal_slices(vol.float())]
        h = max(s.shape[0] for s in slices)
        slices = [F.pad(s, (0, 1, 0, h - s.shape[0]), value=-1.0) for s in slices]
        rows.append(torch.cat(slices, dim=1))
    w = max(r.shape[1] for r in rows)
    rows = [F.pad(r, (0, w - r.shape[1], 0, 1), value=-1.0) for r in rows]
    return ((torch.cat(rows, dim=0).clamp(-1, 1) + 1) / 2).cpu()


class ImageLogger(pl.Callback):
    """Every ``every_n_batches`` training batches, log mid-slices of the first sample to TensorBoard.

    Rows: real A, fake B, reconstructed A, real B, fake A, reconstructed B (all three orientations).
    The extra generator passes run without gradients and only on logging steps.
    """

    def __init__(self, every_n_batches: int = 50) -> None:
        self.every_n_batches = int(every_n_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_batches <= 0 or trainer.fit_loop.total_batch_idx % self.every_n_batches != 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        real_a, real_b = batch["a"][:1], batch["b"][:1]
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            fake_b = pl_module.g_ab(real_a)
            rec_a = pl_module.g_ba(fake_b)
            fake_a = pl_module.g_ba(real_b)
            rec_b = pl_module.g_ab(fake_a)
        pl_module.train(was_training)
        grid = slice_grid([v[0, 0] for v in (real_a, fake_b, rec_a, real_b, fake_a, rec_b)])
        for lg in loggers:
            lg.experiment.add_image("train/a_fakeb_reca__b_fakea_recb", grid, trainer.global_step, dataformats="HW")


class EpochTimer(pl.Callback):
    """Wall time per epoch and in total, logged and written to ``<run dir>/timing.json``."""

    def __init__(self, filename: str = "timing.json") -> None:
        self.filename = filename
        self.epochs: list[float] = []
        self._fit_start = self._epoch_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self.epochs.append(seconds)
        pl_module.log("time/epoch_s", seconds, on_step=False, on_epoch=True, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = time.perf_counter() - self._fit_start
        steps = max(1, trainer.fit_loop.total_batch_idx + 1)
        record = {
            "total_s": round(total, 2),
            "epoch_s": [round(s, 2) for s in self.epochs],
            "batches": trainer.fit_loop.total_batch_idx + 1,
            "s_per_batch": round(sum(self.epochs) / steps, 4),
        }
        out = Path(trainer.default_root_dir) / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
