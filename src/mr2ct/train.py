"""Train a CycleGAN: ``python -m mr2ct.train [overrides]`` (see conf/train.yaml).

Composes the config, builds data, model, callbacks, loggers and trainer with ``hydra.utils.instantiate``
and fits. Examples::

    python -m mr2ct.train                                   # phantom data, small UNet, CPU, minutes
    python -m mr2ct.train generator=unet_updated loss=+spectral trainer.devices=4
    python -m mr2ct.train experiment=mr2ct_spectral data=nifti data.train_a=... data.train_b=...
    python -m mr2ct.train -m data.batch_size=1,2 loss.cycle.weight=3,10
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mr2ct.checkpoints import check_state_dict_compatible, safe_torch_load
from mr2ct.config import CONFIG_DIR, choose_strategy, set_project_root, validate
from mr2ct.errors import ConfigError, find_user_error
from mr2ct.numerics import resolve as resolve_numerics
from mr2ct.training import multistart
from mr2ct.training.checkpointing import SafeCheckpointIO
from mr2ct.training.numerics_trial import NumericsTrial, numerics_trial
from mr2ct.training.nonfinite import NonFiniteError
from mr2ct.training.resume import resume_argv

log = logging.getLogger("mr2ct.train")

PACKAGES = ("torch", "pytorch-lightning", "hydra-core", "omegaconf", "monai", "nibabel", "torchmetrics", "numpy")


def run_info() -> dict[str, Any]:
    """Package versions, Python and the git commit of the code, for the run folder."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "packages": versions, "git_commit": commit or None, "git_dirty": dirty, "argv": sys.argv}


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt=last`` means this run folder's last.ckpt; anything else is a path (or null)."""
    if cfg.get("ckpt") in (None, ""):
        return None
    if cfg.ckpt == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
    else:
        path = Path(cfg.ckpt)
    if not path.is_file():
        hint = " (ckpt=last means this launch's run folder; resume an earlier run with ckpt=<its run folder>)" if cfg.ckpt == "last" else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    return str(path)


def _remove_fresh_run_dir(output_dir: Path) -> None:
    """After a user error at start-up, remove what this launch wrote, so a failed start leaves nothing behind.

    Only the files a start-up writes are removed, and the folder only when it is then empty.
    """
    import shutil

    if not output_dir.is_dir() or (output_dir / "checkpoints").exists():
        return
    for name in (".hydra", "tensorboard", "run_info.json", "config.yaml", "train.log"):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink()
    try:
        output_dir.rmdir()
    except OSError:
        pass


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a checkpoint carries (``translate``/``evaluate`` rebuild the model from it)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}


def build_trainer(cfg: DictConfig, multirun: bool, max_time: timedelta | None = None,
                  extra: list[pl.Callback] | None = None) -> tuple[pl.Trainer, list[Any]]:
    """The configured trainer with its callbacks (and ``extra``) and loggers; ``max_time`` replaces ``trainer.max_time`` when given."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += extra or []
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        strategy=choose_strategy(cfg.trainer, multirun),
        plugins=[SafeCheckpointIO()],  # atomic checkpoint writes, weights_only loads
        **({} if max_time is None else {"max_time": max_time}),
    )
    return trainer, loggers


def pending(trial: NumericsTrial | None) -> list[pl.Callback]:
    """``[trial]`` while it has not chosen yet: a later fit is built in the chosen numerics instead."""
    return [trial] if trial is not None and trial.choice is None else []


def run_starts(cfg: DictConfig, ms: dict[str, Any], datamodule: pl.LightningDataModule, multirun: bool,
               trial: NumericsTrial | None = None) -> tuple[multistart.Start, timedelta | None]:
    """Train ``ms["starts"]`` seeds for ``ms["epochs"]`` epochs each; the best start and the time left for the run.

    The time left is ``trainer.max_time`` minus what the other starts took: the chosen start's
    checkpoint carries its own elapsed time, which Lightning's timer counts on resume.
    """
    folder = Path(cfg.paths.output_dir) / "starts"
    budget = multistart.max_time_seconds(cfg.trainer.get("max_time"))
    t0 = time.monotonic()
    starts: list[multistart.Start] = []
    for i in range(ms["starts"]):
        seed = int(cfg.seed) + i
        sub = multistart.start_config(cfg, seed, folder / f"seed{seed}", ms["epochs"])
        left = None if budget is None else timedelta(seconds=max(1.0, budget - (time.monotonic() - t0)))
        pl.seed_everything(seed, workers=True)
        model = hydra.utils.instantiate(sub.model, _convert_="partial")
        model.run_config = run_config(sub)
        trainer, _ = build_trainer(sub, multirun, left, pending(trial))
        t_start = time.monotonic()
        trainer.fit(model, datamodule=datamodule)
        value = trainer.callback_metrics.get(ms["monitor"])
        starts.append(multistart.Start(seed, str(folder / f"seed{seed}"), None if value is None else float(value), time.monotonic() - t_start))
        log.info("start seed %d: %s = %s", seed, ms["monitor"], starts[-1].score)
    chosen = multistart.best(starts, ms["mode"])
    multistart.write_summary(folder, starts, chosen, ms["monitor"], ms["mode"])
    scores = ", ".join(f"seed {s.seed}: {s.score if s.score is None else round(s.score, 3)}" for s in starts)
    print(f"mr2ct: continuing start seed {chosen.seed} (best {ms['monitor']}; {scores})", flush=True)
    if budget is None:
        return chosen, None
    others = (time.monotonic() - t0) - chosen.seconds
    return chosen, timedelta(seconds=max(1.0, budget - others))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the model described by ``cfg``; returns the final metrics."""
    validate(cfg)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)

    auto_precision = str(cfg.trainer.get("precision", "32-true")) == "auto"
    auto_layout = str(cfg.model.get("memory_format", "contiguous")) == "auto"
    numerics = resolve_numerics(cfg)  # precision / memory format "auto": a probe on this device, before anything is built
    settled: dict[str, Any] = {}  # what the trial on the training steps chose (mr2ct/training/numerics_trial.py)
    trial = numerics_trial(cfg, auto_precision, auto_layout, settled)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="partial")
    model.run_config = run_config(cfg)
    for split in ("train_a", "train_b", "train_pairs", "val", "test"):  # missing/empty folders fail now, not after start-up
        datamodule.records(split)
    if "paired" in cfg.loss and not datamodule.records("train_pairs"):
        raise ConfigError("loss=+paired needs registered training pairs: data.train_pairs_a/data.train_pairs_b (phantom: data.paired_fraction > 0)")
    if getattr(datamodule, "leakcheck", False):  # near-copies of evaluation volumes in training: stop here
        from mr2ct.data.leaks import guard

        guard(datamodule)
    if ckpt_path is not None:  # refuse unsafe, corrupt or foreign checkpoints before any training state exists
        check_state_dict_compatible(model.state_dict(), safe_torch_load(ckpt_path).get("state_dict", {}), ckpt_path)
    chosen = None
    max_time = None
    ms = multistart.settings(cfg, has_validation=bool(datamodule.records("val")))
    if ms is not None:  # several seeds briefly, the best continued (mr2ct/training/multistart.py)
        chosen, max_time = run_starts(cfg, ms, datamodule, multirun, trial)
        ckpt_path = str(chosen.ckpt)
        pl.seed_everything(int(cfg.seed), workers=True)
        model = hydra.utils.instantiate(cfg.model, _convert_="partial")
        model.run_config = run_config(cfg)
    trainer, loggers = build_trainer(cfg, multirun, max_time, pending(trial))

    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        info_path = output_dir / "run_info.json"
        if ckpt_path is not None and info_path.exists():  # a resume keeps the original record
            info_path = output_dir / f"run_info.resume{len(list(output_dir.glob('run_info.resume*.json'))) + 1}.json"
        info = run_info()
        if numerics is not None:
            info["numerics"] = {**dataclasses.asdict(numerics), **settled}
        if chosen is not None:
            info["multistart"] = json.loads((output_dir / "starts" / "summary.json").read_text())
        info_path.write_text(json.dumps(info, indent=2))
        if hydra_cfg is None:  # Hydra already saved .hydra/config.yaml otherwise
            OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    for lg in loggers:  # the resolved config as hyperparameters, in every tracker
        lg.log_hyperparams(config_params(cfg))

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero and settled and "trial_seconds" not in info["numerics"]:  # chosen during this fit
        info["numerics"].update(settled)
        info_path.write_text(json.dumps(info, indent=2))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    if trainer.is_global_zero:
        ckpt_cb = trainer.checkpoint_callback
        lines = [f"run folder:   {output_dir}", f"tensorboard:  tensorboard --logdir {output_dir}"]
        if ckpt_cb is not None:
            lines.append(f"last ckpt:    {Path(ckpt_cb.dirpath or '') / 'last.ckpt'}")
            if ckpt_cb.best_model_path:
                lines.append(f"best ckpt:    {ckpt_cb.best_model_path} ({ckpt_cb.monitor}={float(ckpt_cb.best_model_score):.2f})")
        print("\n".join(["", "mr2ct: training finished", *lines]), flush=True)
    return metrics


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimises: the metric the checkpoint callback monitors (val/mae, val/dice, ...)."""
    monitor = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("monitor") or "val/mae"
    return metrics.get(monitor)


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config flattened to ``group/key`` parameters (what trackers show as hyperparameters)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k not in ("hydra", "paths")}, "")
    return flat


#: set when run as ``python -m mr2ct.train``; in-process callers (tests, notebooks) get SystemExit instead
_OWN_PROCESS = False


def _hard_exit(code: int) -> None:
    """Exit with ``code`` without interpreter finalisation (when this process is ours to end).

    After a failure inside ``Trainer.fit`` a native (torch) worker thread can still be alive, and
    tearing the interpreter down then aborts the process ("terminate called without an active
    exception", status 134) after our one-line message; everything worth keeping is flushed first.
    """
    if not _OWN_PROCESS:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    output_dir = Path(cfg.paths.output_dir)
    try:
        metrics = train(cfg)
    except SIGTERMException:
        print(f"mr2ct: stopped; resume with: python -m mr2ct.train <same overrides> ckpt={output_dir}", file=sys.stderr)
        sys.exit(143)
    except Exception as err:
        # MONAI wraps a bad file's InputError in RuntimeError("applying transform ..."), Hydra's instantiate a
        # data module's ConfigError in InstantiationException: dig them out
        user_err = err if isinstance(err, (FileNotFoundError, NonFiniteError)) else find_user_error(err)
        if user_err is None:
            raise
        log.error(str(user_err))
        print(f"mr2ct: error: {user_err}", file=sys.stderr)
        if isinstance(user_err, NonFiniteError):
            _hard_exit(3)
        _remove_fresh_run_dir(output_dir)  # a no-op in a run folder that already holds checkpoints
        _hard_exit(2)
    return objective(cfg, metrics)  # for Hydra sweepers that optimise a value


def run_cli() -> None:
    """``python -m mr2ct.train`` and ``mr2ct-train``: this process is ours to end."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    set_project_root()
    sys.argv = resume_argv(sys.argv)  # ckpt=<run dir>: continue in that folder
    main()


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("train")
