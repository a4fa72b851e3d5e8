"""Whether the learning-rate schedule ends inside ``trainer.max_time``, told early.

A schedule that ``max_time`` cuts short stops with the learning rate still high. On the phantom that cost
quality in one comparison (a 4800-step schedule cut at 4277 steps against a 4000-step one that ended) and
nothing in another (30 minutes, cut against fitted): README "Translation quality".
A preset's schedule is sized for one machine; on a slower one (a CPU without native bf16, say) the same
preset is cut. :class:`ScheduleBudget` times the first epochs of a run and, when
the rest of the schedule will not fit the time left, warns once with where the run will stop and the
``data.patches_per_epoch`` that would make the schedule end in time. With ``fit=true`` it also shortens
the schedule to what the time left holds (:func:`fitted_schedule`), so that the learning rate reaches
zero at the budget instead of being cut while still high: a budget in minutes then means a whole
schedule on any machine, at the cost of a step count that depends on the machine.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.utilities import rank_zero_warn

from mr2ct.model.cyclegan import linear_decay


def _schedule(pl_module: pl.LightningModule) -> tuple[int, int] | None:
    hp = getattr(pl_module, "hparams", {})
    if "n_epochs" not in hp or "n_epochs_decay" not in hp:
        return None
    return int(hp["n_epochs"]), int(hp["n_epochs_decay"])


def forecast(
    n_epochs: int, n_epochs_decay: int, epochs_done: int, seconds_per_epoch: float, seconds_left: float
) -> dict[str, float] | None:
    """Where a run stops when ``seconds_left`` is too short for the rest of its schedule; ``None`` when it fits.

    Returns the epoch it stops at (``stop_epoch``, 0-based count of epochs done by then), the schedule's
    total epochs, the LR factor there (``lr_factor``, 1 = the base rate) and the time the rest needs.
    """
    total = n_epochs + n_epochs_decay
    need = (total - epochs_done) * seconds_per_epoch
    if need <= seconds_left:
        return None
    stop = epochs_done + max(0, int(seconds_left // seconds_per_epoch))
    return {"stop_epoch": float(stop), "total_epochs": float(total), "lr_factor": linear_decay(n_epochs, n_epochs_decay)(stop),
            "need_s": need, "left_s": seconds_left}


def _listed(schedule: tuple[int, int] | None) -> list[int] | None:
    return None if schedule is None else list(schedule)


def _paired(schedule: list[int] | None) -> tuple[int, int] | None:
    return None if schedule is None else (int(schedule[0]), int(schedule[1]))


def fitted_schedule(
    n_epochs: int, n_epochs_decay: int, epochs_done: int, seconds_per_epoch: float, seconds_left: float, margin: float = 0.05
) -> tuple[int, int]:
    """``(n_epochs, n_epochs_decay)`` of a schedule that ends within ``seconds_left`` from ``epochs_done`` on.

    The schedule shrinks as a whole, keeping its share of constant-rate epochs, with ``margin`` of the time
    left kept free (the last validation and checkpoint). Epochs already done are not undone: a constant
    phase never ends before ``epochs_done``, so the rate never rises; a run already decaying decays to zero
    over the epochs that fit. At least one epoch more is always scheduled.
    """
    total = n_epochs + n_epochs_decay
    fits = epochs_done + max(1, int((1.0 - margin) * seconds_left // seconds_per_epoch))
    if fits >= total:
        return n_epochs, n_epochs_decay
    constant = min(n_epochs, max(epochs_done, round(n_epochs * fits / total)))
    return constant, max(1, fits - constant)


class ScheduleBudget(pl.Callback):
    """Warn once when ``trainer.max_time`` will stop the run before its LR schedule ends.

    Timed over ``epochs`` epochs after the first one of this fit (which pays start-up and kernel selection);
    by default one validation period (``trainer.check_val_every_n_epoch``), so the time includes one
    validation. Silent without ``max_time``, and for fits meant to stop early (``trainer.max_epochs`` or
    ``max_steps`` below the schedule: a multistart start, a smoke test).

    Args:
        epochs: epochs to time before forecasting; ``None``: one validation period.
        fit: also shorten the schedule to end within the time left (:func:`fitted_schedule`), instead of
            only warning; the LR schedulers and ``max_epochs`` follow, and the checkpoints'
            ``n_epochs``/``n_epochs_decay``. A resumed run keeps the fitted schedule unless its config
            changes the schedule it was fitted from.
    """

    def __init__(self, epochs: int | None = None, fit: bool = False) -> None:
        self.epochs = None if epochs is None else max(1, int(epochs))
        self.fit = bool(fit)
        self.fitted: tuple[int, int] | None = None
        self._fitted_from: tuple[int, int] | None = None
        self.forecast: dict[str, float] | None = None
        self._marks: list[float] = []
        self._done = False

    def state_dict(self) -> dict[str, list[int] | None]:
        return {"fitted": _listed(self.fitted), "fitted_from": _listed(self._fitted_from)}

    def load_state_dict(self, state_dict: dict[str, list[int] | None]) -> None:
        self.fitted, self._fitted_from = _paired(state_dict.get("fitted")), _paired(state_dict.get("fitted_from"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed fitted run: its model and trainer come from the config's full schedule, which would
        # raise the rate again, so the fitted one applies (and may shrink further below) -- unless the
        # resume asks for another schedule (model.n_epochs / n_epochs_decay changed), which wins as on any resume
        if self.fitted is not None and _schedule(pl_module) == self._fitted_from:
            self._apply(trainer, pl_module, self.fitted)
        else:
            self.fitted = self._fitted_from = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:
            return
        self._marks.append(time.monotonic())
        span = self.epochs or max(1, int(trainer.check_val_every_n_epoch or 1))
        if len(self._marks) < span + 1:
            return
        self._done = True
        schedule = _schedule(pl_module)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = timer.time_remaining() if timer is not None else None
        if schedule is None or left is None:
            return
        total = sum(schedule)
        if (trainer.max_epochs not in (None, -1) and trainer.max_epochs < total) or trainer.max_steps not in (None, -1):
            return
        per_epoch = (self._marks[-1] - self._marks[0]) / span
        done = trainer.current_epoch + 1
        self.forecast = forecast(*schedule, done, per_epoch, left)
        if self.fit:  # every rank takes rank 0's timing: the ranks must stop at the same epoch
            self.forecast, per_epoch = trainer.strategy.broadcast((self.forecast, per_epoch), src=0)
        if self.forecast is None:
            return
        if self.fit:
            self._shorten(trainer, pl_module, fitted_schedule(*schedule, done, per_epoch, left))
            return
        f = self.forecast
        msg = (f"trainer.max_time will stop this run at about epoch {int(f['stop_epoch'])} of {total}, with the learning "
               f"rate still at {f['lr_factor']:.2f} of its base: at {per_epoch:.0f} s an epoch the rest of the schedule "
               f"needs {f['need_s'] / 60:.0f} min, {f['left_s'] / 60:.0f} are left. Whether a cut run loses "
               f"quality: README, Translation quality (callbacks.schedule_budget.fit=true ends the schedule in time)")
        ppe = getattr(trainer.datamodule, "patches_per_epoch", None) if trainer.datamodule is not None else None
        if ppe:  # the whole schedule in the whole budget, at this epoch time scaled by the patches
            budget = (timer.time_elapsed() or 0.0) + left
            fit = max(1, math.floor(ppe * budget / (total * per_epoch)))
            msg += f"; a schedule that ends in time: data.patches_per_epoch={fit} (now {ppe}), or a longer trainer.max_time"
        else:
            msg += "; shorten model.n_epochs / model.n_epochs_decay, or give a longer trainer.max_time"
        rank_zero_warn(msg)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: tuple[int, int]) -> None:
        n_epochs, n_epochs_decay = schedule
        self.fitted = schedule
        decay = linear_decay(n_epochs, n_epochs_decay)
        for config in trainer.lr_scheduler_configs:  # LambdaLR: cyclegan.configure_optimizers
            config.scheduler.lr_lambdas = [decay for _ in config.scheduler.lr_lambdas]
        pl_module.hparams["n_epochs"], pl_module.hparams["n_epochs_decay"] = n_epochs, n_epochs_decay
        trainer.fit_loop.max_epochs = n_epochs + n_epochs_decay

    def _shorten(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: tuple[int, int]) -> None:
        n_epochs, n_epochs_decay = schedule
        old = _schedule(pl_module)
        if self._fitted_from is None:  # a second fit after a resume: still measured from the config's schedule
            self._fitted_from = old
        self._apply(trainer, pl_module, schedule)
        rank_zero_warn(f"schedule fitted to trainer.max_time (callbacks.schedule_budget.fit): {sum(old)} epochs -> "
                       f"{n_epochs + n_epochs_decay} (constant rate to epoch {n_epochs}, then decay over {n_epochs_decay}), "
                       f"so the learning rate reaches zero within the budget; at the rate timed, the rest of the "
                       f"original schedule needed {self.forecast['need_s'] / 60:.0f} min, {self.forecast['left_s'] / 60:.0f} are left")
