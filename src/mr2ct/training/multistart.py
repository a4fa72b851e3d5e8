"""Several seeds trained briefly, the best by a validation metric continued to the end of the schedule.

An unpaired CycleGAN run settles early into one of a few solutions and keeps it; which one depends on
the seed. On the phantom the MRI->CT generator picks the sign of its intensity map within the first
~200 steps: MRI-dark cortical bone bright and MRI-bright fat dark, or the reverse, which it does not
leave; in T2 the validation bone Dice tells the two apart by then (README "Translation quality"). With
``multistart.starts=K`` training first runs K seeds (``seed``, ``seed+1``, ...) for ``multistart.epochs``
epochs each on the full LR schedule, validates each once, and resumes the best one's checkpoint for the
rest of the run. A ``trainer.max_time`` budget covers the whole thing, the starts included.

Each start keeps its own folder ``<run>/starts/seed<N>/`` (TensorBoard, ``checkpoints/last.ckpt``) and
``<run>/starts/summary.json`` records the scores and the choice.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mr2ct.config import num_devices
from mr2ct.errors import ConfigError

log = logging.getLogger("mr2ct.multistart")


@dataclass
class Start:
    """One short start: its seed, run folder, monitored validation value and wall-clock seconds."""

    seed: int
    folder: str
    score: float | None
    seconds: float

    @property
    def ckpt(self) -> Path:
        return Path(self.folder) / "checkpoints" / "last.ckpt"


#: starts of ``multistart.starts=auto`` (the default) where they can run
AUTO_STARTS = 8


def _unmet(cfg: DictConfig, epochs: int, schedule: int, has_validation: bool) -> tuple[str, str] | None:
    """The first thing the starts need that ``cfg`` lacks: (why ``auto`` trains one start, the error a count gets)."""
    if not 0 < epochs < schedule:
        return (f"the schedule's {schedule} epochs leave no room for starts of {epochs}",
                f"multistart.epochs must be 1 to {schedule - 1} (fewer than the schedule's {schedule} epochs), got {epochs}")
    if cfg.get("seed") is None:
        return "no seed", "multistart.starts > 1 needs a seed (seed=<int>): each start uses seed, seed+1, ..."
    if num_devices(cfg.trainer.get("devices", 1)) > 1 or int(cfg.trainer.get("num_nodes", 1)) > 1:
        return ("several devices: the starts run one after another in one process",
                "multistart.starts > 1 runs its starts one after another in one process: use trainer.devices=1 "
                "(on several devices, launch the seeds as a multirun and resume the best with ckpt=<its run folder>)")
    if not has_validation:
        return ("no validation volumes to choose by (data.val_a/data.val_b)",
                "multistart.starts > 1 chooses by validation: give validation volumes (data.val_a/data.val_b) or multistart.starts=1")
    return None


def settings(cfg: DictConfig, has_validation: bool = True) -> dict[str, Any] | None:
    """The checked ``multistart`` settings, or None for a single start (``starts`` of 1, or a resume).

    ``starts=auto`` (the default) means :data:`AUTO_STARTS` starts where they can run (a seed, one device,
    validation volumes, a schedule longer than a start) and a single start, logged, where they cannot;
    an explicit number refuses the settings it cannot honour. ``has_validation``: whether the data
    module has validation volumes, which the choice needs.
    """
    ms = cfg.get("multistart") or {}
    if cfg.get("ckpt") not in (None, ""):
        return None
    epochs = int(ms.get("epochs", 0))
    schedule = int(cfg.model.n_epochs) + int(cfg.model.n_epochs_decay)
    mode = str(ms.get("mode", "max"))
    if mode not in ("min", "max"):
        raise ConfigError(f"multistart.mode must be min or max, got {mode!r}")
    requested = ms.get("starts", 1)
    unmet = _unmet(cfg, epochs, schedule, has_validation)
    if str(requested) == "auto":
        if unmet is not None:
            log.info("multistart: one start (%s)", unmet[0])
            return None
        starts = AUTO_STARTS
    else:
        try:
            starts = int(requested or 1)
        except (TypeError, ValueError):
            raise ConfigError(f"multistart.starts must be auto or a whole number, got {requested!r}") from None
        if starts <= 1:
            return None
        if unmet is not None:
            raise ConfigError(unmet[1])
    return {"starts": starts, "epochs": epochs, "monitor": str(ms.get("monitor", "val/ssim")), "mode": mode}


def start_config(cfg: DictConfig, seed: int, folder: Path, epochs: int) -> DictConfig:
    """``cfg`` for one start: its seed and folder, stopped after ``epochs`` with one validation at the end.

    The LR schedule (``model.n_epochs``/``n_epochs_decay``) is kept, so the chosen start's checkpoint
    resumes exactly where the full schedule would be.
    """
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(sub, False)
    sub.seed = seed
    sub.paths.output_dir = str(folder)
    sub.trainer.max_epochs = epochs
    sub.trainer.check_val_every_n_epoch = epochs
    if "model_checkpoint" in (sub.get("callbacks") or {}):
        # a start validates once, at its end, so its best checkpoint would be a second copy of last.ckpt
        sub.callbacks.model_checkpoint.save_top_k = 0
    return sub


def max_time_seconds(value: Any) -> float | None:
    """Lightning's ``max_time`` ("DD:HH:MM:SS", a dict of timedelta fields, or null) in seconds."""
    if value in (None, ""):
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (dict, DictConfig)):
        return timedelta(**{k: float(v) for k, v in dict(value).items()}).total_seconds()
    dd, hh, mm, ss = (int(p) for p in str(value).split(":"))
    return float(((dd * 24 + hh) * 60 + mm) * 60 + ss)


def best(starts: list[Start], mode: str) -> Start:
    """The start with the best score (NaN or missing scores lose; ties go to the earlier seed)."""
    scored = [s for s in starts if s.score is not None and math.isfinite(s.score)]
    if not scored:
        raise ConfigError("no start produced a validation score: multistart needs validation volumes (the phantom has them; "
                          "data=nifti: data.val_a/data.val_b) and a multistart.monitor that validation logs (val/dice, val/mae, ...)")
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda s: (sign * float(s.score), -starts.index(s)))


def write_summary(folder: Path, starts: list[Start], chosen: Start, monitor: str, mode: str) -> None:
    data = {"monitor": monitor, "mode": mode, "chosen_seed": chosen.seed, "starts": [asdict(s) for s in starts]}
    (folder / "summary.json").write_text(json.dumps(data, indent=2))
