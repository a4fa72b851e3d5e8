"""Exponential moving average (EMA) of the weights: the model that validation, checkpoints and translation use."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch import Tensor


def ema_decay(decay: float, n_averaged: int) -> float:
    """The decay used for the update after ``n_averaged`` earlier ones: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps a short run's average from being dominated by the initial weights; a long run
    averages over about ``1 / (1 - decay)`` steps.
    """
    return min(float(decay), (1.0 + n_averaged) / (10.0 + n_averaged))


class WeightEMA(WeightAveraging):
    """EMA of every parameter and floating-point buffer of the model, updated after each training batch.

    Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` does the rest: it swaps the average in
    for validation (so ``val/*``, the best checkpoint and the collapse monitor judge the average), saves it
    as the checkpoint's ``state_dict`` (what ``translate``, ``evaluate`` and ``export`` load) with the raw
    weights under ``current_model_state`` (what a resumed run continues from). Unlike Lightning's default,
    the model keeps its raw weights when fitting ends, so that the checkpoint written then still holds both;
    ``trainer.test`` swaps the average in as validation does. The average costs one more copy of the
    weights (counted by ``mr2ct.plan``).

    Args:
        decay: the EMA decay once warmed up (0 <= decay < 1); see :func:`ema_decay`.
        enabled: switch (``callbacks.ema.enabled``); off, the callback does nothing and checkpoints are plain.
    """

    def __init__(self, decay: float = 0.999, enabled: bool = True) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.enabled = bool(enabled)
        super().__init__(use_buffers=True, multi_avg_fn=self._update)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled:
            super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return self.enabled and step_idx is not None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.enabled:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.enabled:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the raw weights (Lightning copies the average over them here)."""

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)

    def _update(self, averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        """One group of same-device, same-dtype tensors (torch's ``multi_avg_fn`` protocol)."""
        if not averaged[0].is_floating_point():  # integer buffers (batch-norm counters) follow the model
            for avg, cur in zip(averaged, current):
                avg.copy_(cur)
            return
        weight = 1.0 - ema_decay(self.decay, int(n_averaged))
        torch._foreach_lerp_(averaged, current, weight)
