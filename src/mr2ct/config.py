"""Config helpers shared by the entry points: resolvers, checks before heavy work, the DDP strategy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mr2ct.errors import ConfigError

_SOURCE_ROOT = Path(__file__).resolve().parents[2]
#: where outputs/ goes by default: the repository in a source checkout, the launch folder for an installed package
PROJECT_ROOT = _SOURCE_ROOT if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "src" / "mr2ct").is_dir() else Path.cwd()
#: the packaged configs (shipped in the wheel); users add their own with --config-dir or hydra.searchpath
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
#: the dtypes ``model.optimizer_state`` may name (torch dtype names)
OPTIMIZER_STATES = ("float32", "bfloat16")

if not OmegaConf.has_resolver("add"):
    OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))


def set_project_root() -> None:
    """Make ``${paths.root_dir}`` point at the repository unless the user chose otherwise."""
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


def num_devices(devices: Any) -> int:
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        if devices == "auto" or devices.strip() == "-1":
            return 2  # could be several: decide as for several
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return 2 if int(devices) == -1 else int(devices)


def choose_strategy(trainer_cfg: DictConfig, multirun: bool = False) -> Any:
    """The Lightning strategy for ``trainer.strategy: auto``.

    One device: ``auto``. Several (or several nodes): DDP with ``find_unused_parameters=True``, because
    the discriminator backward never reaches the generators' parameters and plain DDP refuses that.
    Under a Hydra multirun the popen launcher would re-run the whole sweep in each child, so the
    processes are spawned instead.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if strategy != "auto":
        return strategy
    several = num_devices(trainer_cfg.get("devices", 1)) > 1 or int(trainer_cfg.get("num_nodes", 1)) > 1
    if not several:
        return "auto"
    return "ddp_spawn_find_unused_parameters_true" if multirun else "ddp_find_unused_parameters_true"


def validate(cfg: DictConfig) -> None:
    """Checks that would otherwise fail hours into a run (or silently do the wrong thing)."""
    model, trainer = cfg.get("model") or {}, cfg.get("trainer") or {}
    if "n_epochs" in model and trainer.get("max_epochs") not in (None, -1):
        schedule = int(model.n_epochs) + int(model.n_epochs_decay)
        if int(trainer.max_epochs) != schedule:
            raise ConfigError(
                f"trainer.max_epochs={trainer.max_epochs} would fight the LR schedule, which lasts model.n_epochs + model.n_epochs_decay "
                f"= {schedule} epochs: set model.n_epochs / model.n_epochs_decay instead (or trainer.max_time / trainer.max_steps to stop earlier)"
            )
    patch = list(cfg.data.patch_size)
    if len(patch) != 3 or any(int(p) <= 0 for p in patch):
        raise ConfigError(f"data.patch_size must be 3 positive integers, got {patch}")
    gen = cfg.generator
    divisor = 1
    if "strides" in gen:
        for s in gen.strides:
            divisor *= int(s)
    elif "ngf" in gen:
        divisor = 4
    bad = [int(p) for p in patch if int(p) % divisor]
    if bad:
        raise ConfigError(
            f"data.patch_size {patch} must be divisible by the generator's total stride {divisor} "
            f"(generator {gen._target_.rsplit('.', 1)[-1]})"
        )
    memory_format = str(cfg.model.get("memory_format", "contiguous"))
    if memory_format not in ("auto", "contiguous", "channels_last"):
        raise ConfigError(f"model.memory_format must be auto, contiguous or channels_last, got {memory_format!r}")
    if int(cfg.data.batch_size) < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    for name, term in cfg.loss.items():
        if not isinstance(term, DictConfig):
            continue
        for key in ("weight", "bone_weight"):
            if float(term.get(key, 0.0)) < 0:
                raise ConfigError(f"loss.{name}.{key} must be >= 0, got {term[key]}")
    for key in ("n_epochs", "n_epochs_decay"):
        if int(cfg.model[key]) < 0:
            raise ConfigError(f"model.{key} must be >= 0, got {cfg.model[key]}")
    if int(cfg.model.n_epochs) + int(cfg.model.n_epochs_decay) < 1:
        raise ConfigError("model.n_epochs + model.n_epochs_decay must be >= 1")
    for key in ("lr_g", "lr_d"):
        if key in cfg.model and not float(cfg.model[key]) > 0:
            raise ConfigError(f"model.{key} must be > 0, got {cfg.model[key]}")
    if int(cfg.model.get("pool_size", 0)) < 0:
        raise ConfigError(f"model.pool_size must be >= 0, got {cfg.model.pool_size}")
    state = str(cfg.model.get("optimizer_state", "float32"))
    if state not in OPTIMIZER_STATES:
        raise ConfigError(f"model.optimizer_state must be one of {sorted(OPTIMIZER_STATES)}, got {state!r}")
    window = list(cfg.data.get("ct_window", [-1024, 3000]))
    if len(window) != 2 or not float(window[0]) < float(window[1]):
        raise ConfigError(f"data.ct_window must be [low, high] HU with low < high, got {window}")
    pct = list(cfg.data.get("mri_percentiles", [0.5, 99.5]))
    if len(pct) != 2 or not 0 <= float(pct[0]) < float(pct[1]) <= 100:
        raise ConfigError(f"data.mri_percentiles must be [low, high] with 0 <= low < high <= 100, got {pct}")
    guard = (cfg.get("callbacks") or {}).get("nonfinite_guard")
    if guard is not None and int(guard.get("max_consecutive", 1)) < 1:
        raise ConfigError(f"callbacks.nonfinite_guard.max_consecutive must be >= 1, got {guard.max_consecutive}")
