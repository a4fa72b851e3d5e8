"""The memory format chosen on the run's own training steps (``model.memory_format=auto`` on one device).

The start-up probe (:mod:`mr2ct.numerics`) times one generator's forward+backward on a patch of at most
24 voxels a side, which is enough to tell bf16 from fp32 but can misjudge the layout: for the ResNet
generator on one AVX-512 Xeon it kept contiguous while the whole training step ran faster channels-last
(README, "Memory and speed"). :class:`LayoutTrial` settles the layout on the steps
that train anyway: the first ``2 * (1 + steps)`` batches alternate between the two layouts (one untimed
step in each while the kernels are picked, then ``steps`` timed steps each, interleaved so that a burst of
load from elsewhere slows both alike), and the faster by its best step is kept; the other layout must be
faster by more than ``1 - margin`` to replace the probe's choice. Nothing is recomputed and nothing is
kept twice: the weights, their gradients and the optimizers' state are converted one tensor at a time,
which changes no value (only the order of a convolution's sums, as any change of kernel does).

One device only: under DDP the gradient buckets are laid out once, for the layout the ranks start with,
so there the probe's choice stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from mr2ct.config import num_devices
from mr2ct.numerics import FORMATS

log = logging.getLogger("mr2ct.layout")


def set_layout(pl_module: pl.LightningModule, optimizers: list[torch.optim.Optimizer], channels_last: bool) -> None:
    """Put the module's 5-D weights (and gradients), the optimizers' 5-D state and its input patches in one layout."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    pl_module.to(memory_format=fmt)  # in place (param.data), so the optimizers keep the same Parameter objects
    for opt in optimizers:  # fused Adam walks a parameter and its moments as flat buffers: their layouts must agree
        for state in opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 5:
                    state[key] = value.contiguous(memory_format=fmt)
    pl_module.channels_last = channels_last


class LayoutTrial(pl.Callback):
    """Time the first training steps in both memory formats and keep the faster (see the module docstring).

    Args:
        steps: timed steps per layout.
        margin: the layout the run started in is replaced only when the other's best step takes at most
            this fraction of its best step.
        on_choice: called with ``"contiguous"`` or ``"channels_last"`` and the timings once decided
            (train.py writes the choice into the run's config, so later starts and the continued run
            are built in it).
    """

    def __init__(self, steps: int = 3, margin: float = 0.93, on_choice: Callable[[str, dict[str, list[float]]], None] | None = None) -> None:
        if steps < 1 or not 0 < margin <= 1:
            raise ValueError(f"LayoutTrial needs steps >= 1 and 0 < margin <= 1, got steps={steps}, margin={margin}")
        self.steps, self.margin, self.on_choice = int(steps), float(margin), on_choice
        self.choice: str | None = None
        self.seconds: dict[bool, list[float]] = {False: [], True: []}
        self._start: bool | None = None  # the layout the run started in
        self._count = 0
        self._t0 = 0.0

    @property
    def timings(self) -> dict[str, list[float]]:
        """The timed steps' seconds per layout name."""
        return {FORMATS[k]: [round(s, 4) for s in v] for k, v in self.seconds.items()}

    def _now(self, pl_module: pl.LightningModule) -> float:
        """Seconds on a monotonic clock, after the device has finished what was queued."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.choice is not None:
            return
        if self._start is None:
            self._start = bool(pl_module.channels_last)
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.choice is not None or self._start is None:
            return
        seconds = self._now(pl_module) - self._t0
        current = bool(pl_module.channels_last)
        if self._count >= 2:  # the first step in each layout picks its kernels
            self.seconds[current].append(seconds)
        self._count += 1
        if self._count < 2 * (1 + self.steps):
            set_layout(pl_module, trainer.optimizers, not current)
            return
        start, other = self._start, not self._start
        keep = other if min(self.seconds[other]) <= self.margin * min(self.seconds[start]) else start
        self._decide(trainer, pl_module, keep, "timed")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.choice is None and self._start is not None:  # the fit ended inside the trial: back to the start's layout
            self._decide(trainer, pl_module, self._start, "too few steps to compare")

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, channels_last: bool, why: str) -> None:
        if bool(pl_module.channels_last) != channels_last:
            set_layout(pl_module, trainer.optimizers, channels_last)
        self.choice = FORMATS[channels_last]
        config = getattr(pl_module, "run_config", None)  # the config checkpoints carry from now on
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            config["model"]["memory_format"] = self.choice
        best = ", ".join(f"{FORMATS[k]} {min(v) * 1e3:.0f} ms" for k, v in self.seconds.items() if v)
        log.info("numerics: memory format %s (training steps %s; %s; the other layout must be %.0f%% faster)",
                 self.choice, why, best or "none timed", (1 / self.margin - 1) * 100)
        if self.on_choice is not None:
            self.on_choice(self.choice, self.timings)


def layout_trial(cfg: DictConfig, auto: bool, record: dict[str, Any]) -> LayoutTrial | None:
    """The trial for a run whose ``model.memory_format`` was ``auto`` (the probe's choice is already in ``cfg``).

    One device and eager generators only (DDP lays its gradient buckets out once; a compiled graph would
    recompile). The choice goes into ``cfg`` (later starts and the continued run are built in it) and
    ``record`` (``memory_format`` and ``trial_seconds``, for run_info.json).
    """
    compiled = bool(cfg.model.get("compile", False))
    if not auto or compiled or num_devices(cfg.trainer.get("devices", 1)) > 1 or int(cfg.trainer.get("num_nodes", 1)) > 1:
        return None

    def chosen(memory_format: str, seconds: dict[str, list[float]]) -> None:
        cfg.model.memory_format = memory_format
        record.update(memory_format=memory_format, trial_seconds=seconds)

    return LayoutTrial(on_choice=chosen)
