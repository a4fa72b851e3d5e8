"""Data-pipeline throughput vs the default training step: ``python scripts/bench_data.py [--volumes 32]``.

Writes ``--volumes`` phantom NIfTI volumes (half MRI, half CT, 160×160×128 by default) to a temporary
folder, then prints patch pairs per second delivered by the training DataLoader alone (NIfTI data
module, default augmentation, 32³ patches) uncached and with ``data.cache=memory``, and the rate at
which the default CPU training step (model composed from src/mr2ct/conf/train.yaml) consumes 32³ patch pairs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mr2ct.config import CONFIG_DIR
from mr2ct.data.augment import write_phantom_nifti


def pipeline_rate(root: Path, cache: str, workers: int, samples: int, batches: int, patch: int) -> tuple[float, float]:
    """(setup seconds, patch pairs per second) of the training DataLoader."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=nifti", f"data.train_a={root / 'mri'}", f"data.train_b={root / 'ct'}", f"data.cache={cache}",
            f"data.num_workers={workers}", f"data.samples_per_volume={samples}", f"data.patch_size=[{patch},{patch},{patch}]",
            "data.batch_size=1",
        ])
    dm = instantiate(cfg.data)
    t0 = time.perf_counter()
    dm.setup("fit")
    setup = time.perf_counter() - t0
    loader = dm.train_dataloader()
    n, t0, it = 0, None, iter(loader)
    for i in range(batches + 2):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if i == 1:  # first batches include worker start-up
            n, t0 = 0, time.perf_counter()
        n += batch["a"].shape[0]
    return setup, n / (time.perf_counter() - t0)


def step_rate(steps: int, patch: int) -> tuple[float, float]:
    """(seconds per default training step, patch pairs per second it consumes) on random patches."""
    import pytorch_lightning as pl

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.patch_size=[{patch},{patch},{patch}]"])
    model = instantiate(cfg.model, _convert_="partial")
    bs = int(cfg.data.batch_size)
    data = [{"a": torch.rand(bs, 1, patch, patch, patch) * 2 - 1, "b": torch.rand(bs, 1, patch, patch, patch) * 2 - 1} for _ in range(steps + 2)]
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            times.append(time.perf_counter() - self.t)

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    per_step = sum(times[2:]) / len(times[2:])
    return per_step, bs / per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-volume", type=int, default=4)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--uncached-batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        half = args.volumes // 2
        write_phantom_nifti(root / "mri", range(half), "mri", args.shape, (1.0, 1.0, 1.5))
        write_phantom_nifti(root / "ct", range(half, args.volumes), "ct", args.shape, (1.0, 1.0, 1.5))
        print(f"wrote {args.volumes} volumes {tuple(args.shape)} (.nii.gz) in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [
            ("uncached (cache=none)", "none", args.workers, 1, args.uncached_batches),
            ("cached (cache=memory)", "memory", args.workers, 1, args.batches),
            (f"cached, samples_per_volume={args.samples_per_volume}", "memory", args.workers, args.samples_per_volume, args.batches),
        ]
        results = []
        for name, cache, workers, spv, batches in rows:
            setup, rate = pipeline_rate(root, cache, workers, spv, batches, args.patch)
            results.append((name, rate))
            print(f"data pipeline {name:<34} {rate:8.1f} patch pairs/s   (setup {setup:5.1f} s, {workers} workers)", flush=True)
    per_step, consume = step_rate(args.steps, args.patch)
    print(f"default training step (CPU, {args.patch}^3 patches)     {consume:8.1f} patch pairs/s   ({per_step * 1000:.0f} ms/step)")
    for name, rate in results:
        print(f"  {name:<40} {rate / consume:6.1f} x the step's consumption")


if __name__ == "__main__":
    main()
