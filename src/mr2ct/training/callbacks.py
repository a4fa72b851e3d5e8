"""Lightning callbacks: slice images for TensorBoard, wall-time bookkeeping, heap trimming."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger
from torch import Tensor

from mr2ct.numerics import malloc_trim


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
    """Every ``every_n_batches`` training batches, log mid-slices of the first sample (TensorBoard, MLflow).

    Rows: real A, fake B, reconstructed A, real B, fake A, reconstructed B (all three orientations).
    The extra generator passes run without gradients and only on logging steps.
    """

    def __init__(self, every_n_batches: int = 50) -> None:
        self.every_n_batches = int(every_n_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_batches <= 0 or trainer.fit_loop.total_batch_idx % self.every_n_batches != 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, MLFlowLogger))]
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
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("train/a_fakeb_reca__b_fakea_recb", grid, trainer.global_step, dataformats="HW")
            else:  # MLflow keeps images as artifacts, one per logging step
                image = (grid.detach().float().cpu().clamp(0, 1).numpy() * 255).astype("uint8")
                lg.experiment.log_image(lg.run_id, image, key="train_a_fakeb_reca__b_fakea_recb", step=trainer.global_step)


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


class HeapTrim(pl.Callback):
    """CPU training on glibc: hand freed heap pages back to the OS after every backward (``malloc_trim``).

    glibc keeps freed chunks of up to 32 MB in the process heap for reuse, and a 3D step frees hundreds of
    MB of activations at each backward: resident memory stays that much above the live tensors, by an
    amount that varies from run to run with where the holes fall. Trimming after each backward (the split
    backward's first half included) lowers the peak RSS the next forward builds on. It helps the large
    configurations at almost no cost, but a small generator pays with step time for little memory (its
    pages are faulted back in at every forward; README, "Memory and speed"), hence off by default.
    Does nothing on GPU, or where the C library has no ``malloc_trim`` (musl, macOS, Windows).

    Args:
        enabled: switch (``callbacks.heap_trim.enabled``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._trim: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trim = None
        if not self.enabled or pl_module.device.type != "cpu":
            return
        self._trim = malloc_trim()
        if self._trim is None:
            logging.getLogger("mr2ct").info("heap_trim: no malloc_trim in this C library; nothing to trim")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trim is not None:
            self._trim(0)


class CollapseMonitor(pl.Callback):
    """Mode-collapse diagnostics over the validation translations: ``val/diversity``, ``val/identifiability``.

    Collects (input MRI, synthetic CT) of up to ``max_volumes`` validation volumes, shrunk to at most
    ``max_side`` voxels per side, and computes :func:`mr2ct.evaluation.collapse.collapse_diagnostics` at the end of
    each validation epoch (validation sets of fewer than 4 volumes are cut into Z-blocks). Warns in the
    console when a number falls below its threshold. Reads the ``fake_b`` returned by
    ``validation_step``; under DDP each process judges its own share of the volumes.
    """

    def __init__(self, min_diversity: float = 0.1, min_identifiability: float = 0.75, max_volumes: int = 16, max_side: int = 64) -> None:
        self.min_diversity, self.min_identifiability = float(min_diversity), float(min_identifiability)
        self.max_volumes, self.max_side = int(max_volumes), int(max_side)
        self._inputs: list[Tensor] = []
        self._outputs: list[Tensor] = []
        self.last: dict[str, float] | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inputs, self._outputs = [], []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        from mr2ct.evaluation.collapse import thumbnail

        if trainer.sanity_checking or not isinstance(outputs, dict) or "fake_b" not in outputs:
            return
        for a, fake in zip(batch["a"], outputs["fake_b"]):
            if len(self._inputs) < self.max_volumes:
                self._inputs.append(thumbnail(torch.as_tensor(a[0]), self.max_side))
                self._outputs.append(thumbnail(torch.as_tensor(fake[0]), self.max_side))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.utilities import rank_zero_warn

        from mr2ct.evaluation.collapse import collapse_diagnostics, collapse_warnings, split_for_collapse

        if trainer.sanity_checking or not self._inputs:
            return
        xs, ys = split_for_collapse(self._inputs, self._outputs, min_n=4)
        diag = collapse_diagnostics(xs, ys)
        self.last = diag
        pl_module.log("val/diversity", diag["diversity"], on_epoch=True, batch_size=1)
        pl_module.log("val/identifiability", diag["identifiability"], on_epoch=True, batch_size=1)
        for msg in collapse_warnings(diag, self.min_diversity, self.min_identifiability):
            rank_zero_warn(f"epoch {trainer.current_epoch}: {msg}")
        self._inputs, self._outputs = [], []


class ValidationNiftiWriter(pl.Callback):
    """Every ``every_n_epochs`` epochs, write the synthetic CTs of the first ``n_volumes`` validation volumes.

    Files: ``<run dir>/<dirname>/epoch<E>/<name>_sct.nii.gz`` (int16 HU, the volume's affine), plus the
    input MRI and real CT once under ``<dirname>/reference/``, to open side by side in 3D Slicer or
    ITK-SNAP and watch the translations evolve. Also writes after the last epoch.
    """

    def __init__(self, every_n_epochs: int = 5, n_volumes: int = 2, dirname: str = "val_translations") -> None:
        self.every_n_epochs, self.n_volumes, self.dirname = int(every_n_epochs), int(n_volumes), dirname

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return self.every_n_epochs > 0 and (epoch % self.every_n_epochs == 0 or last)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        from mr2ct.data.transforms import unit_to_hu
        from mr2ct.formats import write_volume

        if trainer.sanity_checking or not trainer.is_global_zero or batch_idx >= self.n_volumes or not self._due(trainer):
            return
        if not isinstance(outputs, dict) or "fake_b" not in outputs:
            return
        window = pl_module.hparams.get("ct_window", (-1024.0, 3000.0))
        root = Path(trainer.default_root_dir) / self.dirname
        names = batch.get("name") or [f"val_{batch_idx:03d}"]
        affine = batch["a"].affine[0].cpu().numpy() if hasattr(batch["a"], "affine") else torch.eye(4).numpy()
        name = str(names[0])
        sct = unit_to_hu(outputs["fake_b"][0, 0].detach().float().cpu(), window).numpy()
        write_volume(sct, affine, root / f"epoch{trainer.current_epoch:03d}" / f"{name}_sct.nii.gz", dtype="int16", overwrite=True)
        ref = root / "reference"
        if not (ref / f"{name}_ct.nii.gz").exists():
            write_volume(torch.as_tensor(batch["a"])[0, 0].float().cpu().numpy(), affine, ref / f"{name}_mri_normalised.nii.gz", overwrite=True)
            ct = unit_to_hu(torch.as_tensor(batch["b"])[0, 0].float().cpu(), window).numpy()
            write_volume(ct, affine, ref / f"{name}_ct.nii.gz", dtype="int16", overwrite=True)
