"""Precision and memory format settled on the run's own training steps (``auto`` on one device).

The start-up probe (:mod:`mr2ct.numerics`) times one generator's forward+backward on a patch of at most
24 voxels a side. That can misjudge both choices for the whole step: for the ResNet generator on one
AVX-512 Xeon it kept contiguous while the training step ran faster channels-last, and for the default
UNet on the same Xeon it timed bf16 autocast at 0.82 of fp32's time while the training step, with both
discriminators and the losses, took as long in either (README, "Memory and speed").
:class:`NumericsTrial` settles them on the steps that train anyway. The candidates (bf16 or fp32, where
precision was ``auto`` and the device runs bf16 natively; contiguous or channels-last, where the memory
format was ``auto``) take turns in ``rounds`` blocks each, so that a burst of load from elsewhere slows
them alike; a block is one untimed step (the kernels are picked, and the heap settles to the new tensor
sizes) and ``steps`` timed steps. A candidate whose best step after a round takes more than ``drop`` times the
best of all so far sits out the later rounds (bf16 autocast on a CPU where it is emulated or slow takes twice
fp32's time and more): the trial then costs the steps of the candidates still in it. The fastest by its best
step is kept if it takes at most ``margin`` of the start's best step (the probe's choice); otherwise the probe's
choice stands.

Nothing is recomputed and nothing is kept twice. A layout change converts the weights, their gradients
and the optimizers' state one tensor at a time; a precision change swaps Lightning's precision plugin
(autocast on or off), while weights, gradients and Adam's state stay fp32 either way. Neither changes a
stored value; they change how the step's arithmetic is done, as any change of kernel does.

One device only: under DDP the gradient buckets are laid out once for the layout the ranks start with,
and the ranks must agree, so there the probe's choice stands; a compiled graph would recompile.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.plugins.precision import MixedPrecision, Precision

from mr2ct.config import num_devices
from mr2ct.numerics import FORMATS, PRECISIONS, bf16_fast, training_device

log = logging.getLogger("mr2ct.numerics")

#: (bf16 autocast, channels-last)
Candidate = tuple[bool, bool]


def candidate_name(candidate: Candidate) -> str:
    """``"fp32/contiguous"``, ``"bf16/channels_last"``, ...: the probe's names for the same choices."""
    return f"{'bf16' if candidate[0] else 'fp32'}/{FORMATS[candidate[1]]}"


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


def set_precision(trainer: pl.Trainer, bf16: bool) -> None:
    """Run the following steps under bf16 autocast or in plain fp32 (Lightning's ``bf16-mixed`` / ``32-true`` plugins)."""
    device = trainer.strategy.root_device.type
    trainer.strategy.precision_plugin = MixedPrecision("bf16-mixed", device) if bf16 else Precision()


def running(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Candidate:
    """The numerics the next step runs in."""
    return "bf16" in str(trainer.precision), bool(pl_module.channels_last)


class NumericsTrial(pl.Callback):
    """Time the first training steps in each candidate numerics and keep the fastest (see the module docstring).

    Args:
        precision: try both bf16 autocast and fp32 (else the run's precision stays).
        layout: try both contiguous and channels-last (else the run's layout stays).
        steps: timed steps per candidate and round.
        rounds: blocks per candidate.
        margin: the numerics the run started in are replaced only when another candidate's best step takes
            at most this fraction of their best step.
        drop: after each round but the last, a candidate whose best step takes more than this multiple of the
            best step of all is not tried again (``inf``: every candidate runs every round).
        on_choice: called with the chosen precision (``"32-true"`` / ``"bf16-mixed"``), memory format and the
            timings once decided (train.py writes the choice into the run's config, so later starts and the
            continued run are built in it).
    """

    def __init__(self, precision: bool = False, layout: bool = True, steps: int = 2, rounds: int = 2, margin: float = 0.93,
                 drop: float = 1.5, on_choice: Callable[[str, str, dict[str, list[float]]], None] | None = None) -> None:
        if steps < 1 or rounds < 1 or not 0 < margin <= 1 or not drop >= 1 or not (precision or layout):
            raise ValueError(f"NumericsTrial needs steps >= 1, rounds >= 1, 0 < margin <= 1, drop >= 1 and something to try, got "
                             f"steps={steps}, rounds={rounds}, margin={margin}, drop={drop}, precision={precision}, layout={layout}")
        self.precision, self.layout = bool(precision), bool(layout)
        self.steps, self.rounds, self.margin, self.drop, self.on_choice = int(steps), int(rounds), float(margin), float(drop), on_choice
        self.choice: Candidate | None = None
        self.candidates: list[Candidate] = []  # the start's numerics first
        self.schedule: list[tuple[Candidate, bool]] = []  # (candidate, timed) per trial step, the rounds so far
        self.seconds: dict[Candidate, list[float]] = {}
        self.steps_taken = 0  # training steps the trial has run (all of it, once ``choice`` is set)
        self._round = 0
        self._t0 = 0.0

    @property
    def timings(self) -> dict[str, list[float]]:
        """The timed steps' seconds per candidate name."""
        return {candidate_name(k): [round(s, 4) for s in v] for k, v in self.seconds.items()}

    @property
    def trial_steps(self) -> int:
        """The most training steps the trial takes (no candidate dropped): ``candidates * rounds * (1 + steps)``."""
        return (1 + self.precision) * (1 + self.layout) * self.rounds * (1 + self.steps)

    def _next_round(self) -> bool:
        """Schedule a block for each candidate still in the trial; False when every round has run."""
        if self._round == self.rounds:
            return False
        if self._round == 0:
            tried = self.candidates
        else:
            best = min(min(v) for v in self.seconds.values() if v)
            tried = [c for c in self.candidates if self.seconds[c] and min(self.seconds[c]) <= self.drop * best]
        self._round += 1
        self.schedule += [(c, i > 0) for c in tried for i in range(1 + self.steps)]
        return True

    def _now(self, pl_module: pl.LightningModule) -> float:
        """Seconds on a monotonic clock, after the device has finished what was queued."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, to: Candidate) -> None:
        bf16, channels_last = running(trainer, pl_module)
        if bf16 != to[0]:
            set_precision(trainer, to[0])
        if channels_last != to[1]:
            set_layout(pl_module, trainer.optimizers, to[1])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.choice is not None:
            return
        if not self.candidates:
            bf16, channels_last = running(trainer, pl_module)  # the start's numerics come first
            precisions = (bf16, not bf16) if self.precision else (bf16,)
            layouts = (channels_last, not channels_last) if self.layout else (channels_last,)
            self.candidates = list(itertools.product(precisions, layouts))
            self.seconds = {c: [] for c in self.candidates}
            self._next_round()
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.choice is not None or not self.candidates:
            return
        seconds = self._now(pl_module) - self._t0
        candidate, timed = self.schedule[self.steps_taken]
        if timed:
            self.seconds[candidate].append(seconds)
        self.steps_taken += 1
        if self.steps_taken < len(self.schedule) or self._next_round():
            self._switch(trainer, pl_module, self.schedule[self.steps_taken][0])
            return
        start = self.candidates[0]
        fastest = min(self.candidates, key=lambda c: min(self.seconds[c]))
        keep = fastest if min(self.seconds[fastest]) <= self.margin * min(self.seconds[start]) else start
        self._decide(trainer, pl_module, keep, "timed")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.choice is None and self.candidates:  # the fit ended inside the trial: back to the start's numerics
            self._decide(trainer, pl_module, self.candidates[0], "too few steps to compare")

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, keep: Candidate, why: str) -> None:
        self._switch(trainer, pl_module, keep)
        self.choice = keep
        precision, memory_format = PRECISIONS[keep[0]], FORMATS[keep[1]]
        config = getattr(pl_module, "run_config", None)  # the config checkpoints carry from now on
        if isinstance(config, dict):
            if isinstance(config.get("trainer"), dict):
                config["trainer"]["precision"] = precision
            if isinstance(config.get("model"), dict):
                config["model"]["memory_format"] = memory_format
        best = ", ".join(f"{candidate_name(k)} {min(v) * 1e3:.0f} ms" for k, v in self.seconds.items() if v)
        log.info("numerics: %s (training steps %s; %s; another candidate must be %.1f%% faster than %s)", candidate_name(keep),
                 why, best or "none timed", (1 / self.margin - 1) * 100, candidate_name(self.candidates[0]))
        if self.on_choice is not None:
            self.on_choice(precision, memory_format, self.timings)


def trial_axes(cfg: DictConfig, precision_auto: bool, layout_auto: bool) -> dict[str, bool] | None:
    """What the trial tries for a run whose ``trainer.precision`` / ``model.memory_format`` was ``auto``, as
    :class:`NumericsTrial` keywords, or None for no trial: precision only where the training device runs bf16
    natively; one device, eager generators and no activation savers only."""
    compiled = bool(cfg.model.get("compile", False))
    if compiled or num_devices(cfg.trainer.get("devices", 1)) > 1 or int(cfg.trainer.get("num_nodes", 1)) > 1:
        return None
    if bool(cfg.model.get("split_backward", False)) or bool(cfg.generator.get("checkpointing", False)):
        # a run that asked for less memory: the candidates' steps and the switches between them raise its peak above
        # what any one candidate holds (fp32 steps twice the activations; each layout switch rewrites every weight,
        # gradient and moment), so the probe's choice stands
        return None
    precision = precision_auto and bf16_fast(training_device(str(cfg.trainer.get("accelerator", "auto"))))
    return {"precision": precision, "layout": layout_auto} if precision or layout_auto else None


def numerics_trial(cfg: DictConfig, precision_auto: bool, layout_auto: bool, record: dict[str, Any]) -> NumericsTrial | None:
    """The trial for a run whose ``trainer.precision`` and/or ``model.memory_format`` was ``auto`` (the probe's choice is in ``cfg``).

    The choice goes into ``cfg`` (later starts and the continued run are built in it) and ``record``
    (``precision``, ``memory_format`` and ``trial_seconds``, for run_info.json).
    """
    axes = trial_axes(cfg, precision_auto, layout_auto)
    if axes is None:
        return None

    def chosen(precision: str, memory_format: str, seconds: dict[str, list[float]]) -> None:
        cfg.trainer.precision = precision
        cfg.model.memory_format = memory_format
        record.update(precision=precision, memory_format=memory_format, trial_seconds=seconds)

    return NumericsTrial(**axes, on_choice=chosen)
