"""Keeping week-long runs alive: atomic and safe checkpoints, pre-emption, NaN guards, resume folders.

- :func:`atomic_torch_save` / :class:`SafeCheckpointIO`: a checkpoint on disk is always a whole file
  (temp file in the same folder, fsync, ``os.replace``); loading uses ``torch.load(weights_only=True)``.
- :func:`safe_torch_load`: the only way the project reads a ``.ckpt``; a pickle that would run code,
  a truncated file or a missing one becomes an :class:`~mr2ct.config.InputError` with one clear line.
- :class:`PreemptionCheckpoint`: SIGTERM (cluster pre-emption) or Ctrl-C stops at the next batch
  boundary and saves ``last.ckpt``; :class:`RngStateCheckpoint` stores the random generators in it.
- :class:`NonFiniteGuard`: a batch with a non-finite loss or gradient is skipped and counted; after
  ``max_consecutive`` bad batches in a row training stops with :class:`NonFiniteError`.
- :func:`resume_argv`: ``ckpt=<run dir>`` makes a resumed launch write into the original run folder.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from mr2ct.config import InputError  # noqa: F401  (re-exported for callers)
from mr2ct.export import atomic_torch_save, check_state_dict_compatible, safe_torch_load  # noqa: F401

log = logging.getLogger("mr2ct.guards")


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many batches in a row."""


# -- checkpoint files ------------------------------------------------------------------------------
class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes (:func:`atomic_torch_save`), safe reads (:func:`safe_torch_load`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")


# -- random generators -----------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors / ints (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


class RngStateCheckpoint(pl.Callback):
    """Store the global random generators in every checkpoint and restore them on resume."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])


# -- pre-emption -----------------------------------------------------------------------------------
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


# -- non-finite losses and gradients ---------------------------------------------------------------
def first_nonfinite(terms: Mapping[str, Tensor]) -> str | None:
    """Name of the first term that is NaN or infinite (None when all are finite)."""
    bad = [name for name, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    return bad[0] if bad else None


def first_nonfinite_grad(params: Iterable[torch.nn.Parameter]) -> torch.nn.Parameter | None:
    """The first parameter whose gradient holds a NaN or Inf (None when all are finite)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    total = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
    if bool(torch.isfinite(total)):
        return None
    for p in params:
        if not bool(torch.isfinite(p.grad).all()):
            return p
    return params[0]  # finite entries whose squares overflow: as bad as a NaN


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps whose loss or gradient is not finite; stop after ``max_consecutive`` bad batches.

    The LightningModule asks :meth:`ok` before each optimizer step (``CycleGAN._step_ok``); the guard
    attaches itself to the module at fit start. Skipped steps leave weights, optimizer moments and
    the image pools untouched, so the last checkpoint (and every later one) holds finite weights.
    Logged: ``guard/skipped`` (total skipped optimizer steps).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if int(max_consecutive) < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0
        self._bad_in_batch: str | None = None
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.nonfinite_guard = self  # type: ignore[attr-defined]
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def ok(self, trainer: pl.Trainer, terms: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, prefix: str = "") -> bool:
        """True when every loss term and every gradient of ``optimizer`` is finite; else record and skip."""
        bad = first_nonfinite(terms)
        if bad is not None:
            what = f"loss term {prefix}{bad}"
        else:
            param = first_nonfinite_grad(p for g in optimizer.param_groups for p in g["params"])
            if param is None:
                return True
            what = f"gradient of {self._names.get(id(param), 'a parameter')} (losses finite)"
        self.skipped += 1
        self._bad_in_batch = self._bad_in_batch or what
        log.warning("non-finite %s at step %d (epoch %d, batch %d): optimizer step skipped",
                    what, trainer.global_step, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx)
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bad, self._bad_in_batch = self._bad_in_batch, None
        self.consecutive = self.consecutive + 1 if bad else 0
        pl_module.log("guard/skipped", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")
        if bad and self.consecutive >= self.max_consecutive:
            ckpt_cb = trainer.checkpoint_callback
            last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None and ckpt_cb.dirpath else None
            where = f"; last good checkpoint: {last}" if last is not None and last.is_file() else "; no checkpoint was saved yet"
            raise NonFiniteError(
                f"training stopped: non-finite {bad} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}), {self.consecutive} bad batches in a row "
                f"(callbacks.nonfinite_guard.max_consecutive={self.max_consecutive}){where}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# -- resuming into the original run folder ---------------------------------------------------------
def _run_dir_of(value: str) -> Path | None:
    """The run folder a ``ckpt`` value points into: ``<run>`` itself or ``<run>/checkpoints/x.ckpt``."""
    path = Path(value).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path.resolve()
    if path.is_file() and path.parent.name == "checkpoints":
        return path.parent.parent.resolve()
    return None


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite a training command line so a resume writes into the run folder it resumes.

    ``ckpt=<run dir>`` (meaning ``<run dir>/checkpoints/last.ckpt``) or
    ``ckpt=<run dir>/checkpoints/<file>.ckpt`` add ``hydra.run.dir=<run dir>`` (unless given) and
    keep the original ``.hydra/`` by writing this launch's config to ``.hydra/resume-<time>/``.
    Anything else is returned unchanged.
    """
    args = list(argv)
    if any(a in ("-m", "--multirun") or a.startswith(("hydra.run.dir=", "hydra/run.dir=")) for a in args[1:]):
        return args
    for i, arg in enumerate(args[1:], start=1):
        if not arg.startswith("ckpt="):
            continue
        value = arg.split("=", 1)[1].strip("'\"")
        run_dir = _run_dir_of(value) if value not in ("", "last", "null") else None
        if run_dir is None:
            return args
        if Path(value).is_dir():
            args[i] = f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        return [*args, f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    return args
