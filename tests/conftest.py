"""Shared fixtures: compose the real Hydra configs with tiny sizes, run the real entry points."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mr2ct.config import CONFIG_DIR, PROJECT_ROOT

torch.set_num_threads(2)

#: overrides that shrink any run to seconds: tiny phantom, 16^3 patches, 4-8 channel networks
TINY = [
    "data.shape=[24,24,32]",
    "data.spacing=[6.0,6.0,6.0]",
    "data.patch_size=[16,16,16]",
    "data.n_train=2",
    "data.patches_per_epoch=null",  # an epoch = one patch per training volume: steps counted by n_train
    "data.n_val=1",
    "data.n_test=1",
    "data.batch_size=1",
    "discriminator.ndf=4",
    "discriminator.n_layers=2",
    "model.n_epochs=1",
    "model.n_epochs_decay=0",
    "callbacks.image_logger.every_n_batches=1",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
    # fixed numerics: the same results on any machine; tests of `auto` (the default) set it back
    "trainer.precision=32-true",
    "model.memory_format=contiguous",
]
AUTO_NUMERICS = ["trainer.precision=auto", "model.memory_format=auto"]

TINY_GENERATOR = {
    "unet": ["generator.channels=[4,8,16]", "generator.strides=[2,2]"],
    "unet_updated": ["generator.channels=[4,8,8,8,8]", "generator.strides=[2,2,2,1]", "generator.num_res_units=1"],
    "resnet3d_2blk": ["generator.ngf=4"],
    "resnet3d_9blk": ["generator.ngf=2", "generator.n_blocks=2"],
}


def tiny(generator: str = "unet") -> list[str]:
    return [*TINY, *TINY_GENERATOR[generator]]


def compose_train_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config exactly as `python -m mr2ct.train <overrides>` would see it, writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    def make(overrides: list[str]) -> DictConfig:
        return compose_train_cfg(overrides, tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` like a user would; output captured for assertions."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_tool_here(args: list[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process: ``mr2ct.cli.run_tool``, the entry behind ``python -m mr2ct.<tool>``.

    Same exit code and output, without a new interpreter's start-up (about 8 s of imports); each tool keeps
    at least one test through :func:`run_cli`, the real process.
    """
    import mr2ct.train
    from mr2ct.cli import run_tool

    tool = args[0].removeprefix("mr2ct.")
    capsys.readouterr()
    GlobalHydra.instance().clear()
    old_argv, old_cwd = sys.argv, os.getcwd()
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    sys.argv = [f"{tool}.py", *args[1:]]
    code = 0
    # train's run_cli marks the process as its own to end with os._exit; this one is pytest's
    hard_exit, mr2ct.train._hard_exit = mr2ct.train._hard_exit, sys.exit
    try:
        run_tool(tool)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        mr2ct.train._hard_exit, mr2ct.train._OWN_PROCESS = hard_exit, False
        sys.argv = old_argv
        os.chdir(old_cwd)
        for handler in root.handlers[:]:  # Hydra's job logging: its handlers write to this test's captured streams
            if handler not in old_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(old_level)
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
