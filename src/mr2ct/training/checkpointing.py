"""How training writes checkpoints: atomically, read back safely, on a clock, and on pre-emption.

- :class:`SafeCheckpointIO`: Lightning's checkpoint IO through :func:`mr2ct.checkpoints.atomic_torch_save`
  (a checkpoint on disk is always a whole file) and :func:`mr2ct.checkpoints.safe_torch_load`.
- :class:`PreemptionCheckpoint`: SIGTERM (cluster pre-emption) or Ctrl-C stops at the next batch
  boundary and saves ``last.ckpt``; a second Ctrl-C aborts.
- :class:`LastCheckpoint`: ``last.ckpt`` on a wall-clock interval and when fitting ends, whatever ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mr2ct.checkpoints import atomic_torch_save, safe_torch_load

log = logging.getLogger("mr2ct.training")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes (:func:`atomic_torch_save`), safe reads (:func:`safe_torch_load`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or a first Ctrl-C, finish the current batch, save ``<dirpath>/last.ckpt`` and stop.

    Lightning 2.6 already turns SIGTERM into a flag checked at batch boundaries (then raises
    ``SIGTERMException``) but saves nothing outside SLURM auto-requeue. Ctrl-C would raise
    ``KeyboardInterrupt`` wherever the interpreter happens to be (possibly between the two optimizer
    steps), so the first one is re-sent as SIGTERM to reach the same clean stop; a second Ctrl-C
    aborts at once without saving.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.signal_name: str | None = None
        self.saved_path: str | None = None
        self._previous_sigint: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = "SIGINT"
        print("\nmr2ct: Ctrl-C: stopping after this batch and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self.signal_name = self.signal_name or "SIGTERM"
        ckpt_cb = trainer.checkpoint_callback
        folder = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename
        if isinstance(ckpt_cb, ModelCheckpoint):
            # ModelCheckpoint's own state then names this file as its last checkpoint: after the resume
            # it keeps overwriting last.ckpt instead of starting last-v1.ckpt beside it
            ckpt_cb.last_model_path = str(path)
        trainer.save_checkpoint(path)
        self.saved_path = str(path)
        if trainer.is_global_zero:
            print(
                f"mr2ct: {self.signal_name} received: checkpoint saved at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}: {path}",
                file=sys.stderr,
                flush=True,
            )


class LastCheckpoint(pl.callbacks.ModelCheckpoint):
    """``last.ckpt`` on a wall-clock interval and/or every N batches, independent of validation, and at the end.

    The best-model checkpoint is written only when validation runs (every few epochs); a run killed in
    between (SIGKILL, the OOM killer, a node failure: nothing to catch) would lose everything since. This
    callback bounds the loss to ``every_n_minutes`` of training, and writes ``last.ckpt`` once more when
    fitting ends for any reason (``trainer.max_time``, ``max_steps``, the schedule's end). A checkpoint written
    mid-epoch resumes mid-epoch. Scores nothing and keeps no other file.

    Args:
        dirpath: checkpoint folder (the run's ``checkpoints/``).
        every_n_minutes: wall-clock interval between saves (None: off).
        every_n_batches: batches between saves (None: off); each batch is two optimizer steps.
    """

    def __init__(self, dirpath: str, every_n_minutes: float | None = 15.0, every_n_batches: int | None = None) -> None:
        from datetime import timedelta

        interval = timedelta(minutes=float(every_n_minutes)) if every_n_minutes else None
        # Lightning counts optimizer steps: two per batch with the two CycleGAN optimizers
        steps = 2 * int(every_n_batches) if every_n_batches and interval is None else None
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, monitor=None, train_time_interval=interval,
                         every_n_train_steps=steps, save_on_train_epoch_end=False, enable_version_counter=False)
        self.every_n_batches = int(every_n_batches) if every_n_batches else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # both triggers at once: the time interval is Lightning's, the batch count ours
        if self.every_n_batches and self._train_time_interval is not None and trainer.global_step % (2 * self.every_n_batches) == 0:
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # skipped when this step is on disk already (validation's checkpoint at the schedule's end)
        saved = {getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks}
        if trainer.global_step > 0 and trainer.global_step not in saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"
