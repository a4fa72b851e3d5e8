"""Measurements in a fresh process (its peak RSS is its own): a real ``pl.Trainer`` fitting random patches,
or a sliding-window translation. Worker: ``python -m mr2ct.profiling.measure '<json>'``."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mr2ct.profiling.ceilings import _sync
from mr2ct.profiling.memory import current_rss, peak_rss
from mr2ct.profiling.trace import build_model, random_batch


def compose(overrides: Sequence[str], config_name: str = "train", resolve_auto: bool = True) -> DictConfig:
    """The config as ``python -m mr2ct.<config_name> <overrides>`` runs it (outputs to a temp dir).

    For ``train``, ``auto`` precision and memory format are resolved as the tool resolves them (a probe),
    unless ``resolve_auto=False``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mr2ct.config import CONFIG_DIR, set_project_root

    set_project_root()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = tempfile.mkdtemp(prefix="mr2ct-bench-")
    if config_name == "train" and resolve_auto:
        from mr2ct.numerics import resolve

        resolve(cfg)
    return cfg


#: config keys under ``callbacks`` that the measured training steps run with
MEMORY_CALLBACKS = ("heap_trim",)


class _StepTimer:
    """Lightning callback recording the wall time of each training batch (one full CycleGAN step); the fit stops
    once ``batches()`` batches have run."""

    def __new__(cls, device: torch.device, batches: Callable[[], int]):  # built lazily: importing Lightning costs seconds
        import pytorch_lightning as pl

        class StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self._t0 = 0.0

            def on_train_batch_start(self, *args: Any) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t0)
                if len(self.times) >= batches():
                    trainer.should_stop = True
                if len(self.times) == 1 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

        return StepTimer()


def _measure_train(overrides: Sequence[str], steps: int, threads: int | None, trial: dict[str, bool] | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps after one untimed step; with ``trial`` (``{"precision": bool, "layout": bool}``: what
    was ``auto`` in the run, as ``mr2ct.train`` runs it) after the numerics trial's steps instead, in the numerics it kept."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from mr2ct.numerics import FORMATS
    from mr2ct.training.numerics_trial import NumericsTrial

    cfg = compose(overrides)
    trial = NumericsTrial(**trial) if trial else None

    # untimed steps before the measured ones: one warm-up, or the trial's steps (fewer than its most when it drops a candidate)
    most_skipped = 1 if trial is None else trial.trial_steps

    def skipped() -> int:
        return trial.steps_taken if trial is not None and trial.choice is not None else most_skipped

    runtime = current_rss()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
    pl.seed_everything(0, verbose=False)
    model = build_model(cfg)
    batch, patch = int(cfg.data.batch_size), list(cfg.data.patch_size)

    class Patches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch * (steps + most_skipped)

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {k: v[0] for k, v in random_batch(1, patch).items()}

    loader = torch.utils.data.DataLoader(Patches(), batch_size=batch)
    timer = _StepTimer(device, lambda: skipped() + steps)
    # the callbacks that change a step's memory or time; the rest (images, validation, checkpoints) do not run
    memory = [instantiate(cfg.callbacks[k]) for k in MEMORY_CALLBACKS if k in (cfg.get("callbacks") or {})]
    trainer = instantiate(
        cfg.trainer, default_root_dir=cfg.paths.output_dir, max_steps=2 * (steps + most_skipped), max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, *memory, *([trial] if trial else [])], devices=1, strategy="auto",
    )
    trainer.fit(model, train_dataloaders=loader)
    # the first step pays allocation, oneDNN kernel selection, compilation (steps=0: memory only)
    times = timer.times[skipped():] or timer.times[:1]
    out: dict[str, Any] = {
        "precision": str(trainer.precision), "memory_format": FORMATS[bool(model.channels_last)],
        "trial_seconds": None if trial is None else trial.timings,
        "device": device.type, "threads": torch.get_num_threads(), "step_times": times,
        "median_s": statistics.median(times), "first_step_s": timer.times[0],
        "peak_rss": peak_rss(), "runtime_rss": runtime, "steps": len(times), "pool_images": batch * len(timer.times),
    }
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def _measure_translate(
    overrides: Sequence[str], shape: Sequence[int], roi: Sequence[int], overlap: float, sw_batch_size: int | str, repeats: int,
    bounded_heap: bool = True, precision: str = "auto",
) -> dict[str, Any]:
    """What ``python -m mr2ct.translate`` runs per volume: one generator (as a checkpoint rebuilds it), the
    run's numerics (:func:`mr2ct.inference.inference_numerics`), sliding windows stitched on the CPU."""
    from hydra.utils import instantiate

    from mr2ct.inference import bound_cpu_heap, inference_numerics, translate_volume
    from mr2ct.nets import init_weights

    cfg = compose(overrides)
    runtime = current_rss()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bound_cpu_heap(device, bounded_heap)
    precision, memory_format = inference_numerics(device, precision)
    fmt = torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format
    net = init_weights(instantiate(cfg.generator)(), str(cfg.model.init_type), float(cfg.model.init_gain)).to(device, memory_format=fmt).eval()
    vol = torch.rand(1, 1, *[int(s) for s in shape]) * 2 - 1
    chosen = _Messages()  # what NumericsChooser kept for the auto values, as the tools log it
    logging.getLogger("mr2ct.inference").addHandler(chosen)
    logging.getLogger("mr2ct.inference").setLevel(logging.INFO)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        translate_volume(net, vol, roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="gaussian", sw_device=device, device="cpu",
                         precision=precision, memory_format=memory_format)
        _sync(device)()
        times.append(time.perf_counter() - t0)
    voxels = int(torch.tensor([int(s) for s in shape]).prod())
    med = statistics.median(times)
    return {"seconds": med, "times": times, "voxels_per_s": voxels / med, "peak_rss": peak_rss(), "runtime_rss": runtime,
            "shape": list(shape), "roi": list(roi), "precision": precision, "memory_format": memory_format, "chosen": chosen.lines}


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def measure(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run a measurement ``job`` in a fresh Python process (so its peak RSS is its own) and return its result.

    ``job``: ``{"kind": "train", "overrides": [...], "steps": n, "trial": {"precision": false, "layout": true}}`` or ``{"kind": "translate", "overrides":
    [...], "shape": [X, Y, Z], "roi": [...], "overlap": 0.25, "sw_batch_size": 1, "repeats": 1, "bounded_heap": true, "precision": "auto"}``; either may name
    ``"preload": [modules]`` to import first.
    """
    # A minimal environment: the calling process may carry Lightning's PL_*/rank variables, torch
    # compile/inductor settings and the like, and a measurement must not depend on what ran before it.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "mr2ct.profiling.measure", json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MR2CT_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({job}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("MR2CT_RESULT "):])


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    for name in job.get("preload", ()):  # the modules the measured tool imports: their memory is part of its peak
        importlib.import_module(name)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job["kind"] == "train":
        return _measure_train(job["overrides"], int(job.get("steps", 3)), job.get("threads"), job.get("trial"))
    if job["kind"] == "translate":
        return _measure_translate(job["overrides"], job["shape"], job["roi"], float(job.get("overlap", 0.25)),
                                  job.get("sw_batch_size", "auto"), int(job.get("repeats", 1)), bool(job.get("bounded_heap", True)),
                                  str(job.get("precision", "auto")))
    raise ValueError(f"unknown job kind {job['kind']!r}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print("MR2CT_RESULT " + json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
