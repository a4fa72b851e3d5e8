"""The NaN guard: a batch with a non-finite loss or gradient is skipped and counted.

After ``max_consecutive`` bad batches in a row training stops with :class:`NonFiniteError` (the train
tool exits 3 with one line naming the term). A skipped batch leaves weights, Adam moments and image
pools as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

log = logging.getLogger("mr2ct.training")


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many batches in a row."""


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
