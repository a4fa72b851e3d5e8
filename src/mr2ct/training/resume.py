"""Resuming exactly: the random generators saved in a checkpoint, and a resumed launch writing into its run folder."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


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
