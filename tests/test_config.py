"""The real config tree composes to what the README promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mr2ct.config import CONFIG_DIR, choose_strategy, validate
from mr2ct.errors import ConfigError
from mr2ct.training import multistart

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def test_default_config_is_the_cpu_demo(train_cfg):
    cfg = train_cfg([])
    assert cfg.data._target_.endswith("PhantomDataModule")
    assert sorted(cfg.loss) == ["adversarial", "cycle", "mind"]  # identity off, MIND on: README "Translation quality"
    assert cfg.loss.mind.weight == 5.0
    assert cfg.loss.cycle.weight == 10.0
    assert cfg.data.body_patch_prob == 0.9 and cfg.data.patches_per_epoch == 32  # 3200 steps after the starts: the quality table
    assert cfg.multistart.starts == "auto" and cfg.multistart.epochs == 5  # eight short starts, the best continued ...
    assert multistart.AUTO_STARTS == 8
    assert cfg.multistart.monitor == "val/ssim"  # ... chosen by SSIM, which tells the map's sign: README "Translation quality"
    assert cfg.data.augment.noise_prob == 0.0  # no noise on patches: README "Noise augmentation in the CT domain"
    assert train_cfg(["data=nifti"]).data.augment.noise_prob == 0.0  # the same for the user's folders
    assert cfg.trainer.precision == "auto" and cfg.model.memory_format == "auto"  # chosen per machine at start-up
    assert cfg.discriminator.spectral_norm is False
    assert cfg.trainer.max_epochs == cfg.model.n_epochs + cfg.model.n_epochs_decay
    assert choose_strategy(cfg.trainer) == "auto"
    validate(cfg)


def test_design_command_composes_to_intended_config(train_cfg):
    """`python -m mr2ct.train generator=unet_updated loss=+spectral trainer.devices=4`"""
    cfg = train_cfg(["generator=unet_updated", "loss=+spectral", "trainer.devices=4"])
    assert cfg.generator.num_res_units == 2 and len(cfg.generator.channels) == 5
    assert sorted(cfg.loss) == ["adversarial", "cycle", "mind"]  # the default set ...
    assert cfg.discriminator.spectral_norm is True  # ... plus spectral normalisation
    assert cfg.trainer.devices == 4
    assert choose_strategy(cfg.trainer) == "ddp_find_unused_parameters_true"
    assert choose_strategy(cfg.trainer, multirun=True) == "ddp_spawn_find_unused_parameters_true"
    disc = instantiate(cfg.discriminator)()
    assert all(hasattr(m, "parametrizations") for m in disc.modules() if m.__class__.__name__ == "Conv3d")


@pytest.mark.parametrize(
    "overrides, terms, spectral",
    [
        (["loss=+gc"], {"adversarial", "cycle", "mind", "gc"}, False),
        (["loss=+perceptual"], {"adversarial", "cycle", "mind", "perceptual"}, False),
        (["+loss=gc"], {"adversarial", "cycle", "mind", "gc"}, False),
        (["loss=[+spectral,gc]"], {"adversarial", "cycle", "mind", "gc"}, True),
        (["loss=[+gc,perceptual,spectral]"], {"adversarial", "cycle", "mind", "gc", "perceptual"}, True),
        (["loss=+mind"], {"adversarial", "cycle", "mind"}, False),  # commands from before MIND was a default still compose
        (["loss=[+spectral,mind]"], {"adversarial", "cycle", "mind"}, True),
        (["loss=[adversarial,cycle]"], {"adversarial", "cycle"}, False),
        (["loss=[adversarial,cycle,spectral]"], {"adversarial", "cycle"}, True),
    ],
)
def test_loss_set_overrides(train_cfg, overrides, terms, spectral):
    cfg = train_cfg(overrides)
    assert set(cfg.loss) == terms
    assert cfg.discriminator.spectral_norm is spectral


def test_lambda_cycle_key_and_strategy_choices(train_cfg):
    cfg = train_cfg(["loss.cycle.weight=3", "trainer.devices=1"])
    assert cfg.loss.cycle.weight == 3
    assert choose_strategy(cfg.trainer) == "auto"
    assert choose_strategy(train_cfg(["trainer=ddp"]).trainer) == "ddp_find_unused_parameters_true"
    assert choose_strategy(train_cfg(["trainer.num_nodes=2"]).trainer) == "ddp_find_unused_parameters_true"


@pytest.mark.parametrize("preset", PRESETS)
def test_experiment_presets_compose(train_cfg, preset):
    cfg = train_cfg([f"experiment={preset}"])
    validate(cfg)
    assert cfg.trainer.max_epochs == cfg.model.n_epochs + cfg.model.n_epochs_decay


def test_presets_carry_the_structure_term_and_can_drop_it(train_cfg):
    """The default and experiment=cpu_30min include MIND (measured in the README); loss=[adversarial,cycle] removes it."""
    for preset in ([], ["experiment=cpu_30min"]):
        c = train_cfg(preset)
        assert set(c.loss) == {"adversarial", "cycle", "mind"} and c.loss.mind.weight > 0
        assert set(train_cfg([*preset, "loss=[adversarial,cycle]"]).loss) == {"adversarial", "cycle"}
    assert set(train_cfg(["experiment=paired_only"]).loss) == {"adversarial", "cycle", "paired"}  # measured without it


def test_original_presets_carry_the_notes_numbers(train_cfg):
    c = train_cfg(["experiment=mr2ct_new_unetUpdated"])
    assert (c.generator.num_res_units, c.data.batch_size, c.model.n_epochs, c.trainer.max_epochs) == (2, 2, 75, 100)
    c = train_cfg(["experiment=mr2ct_unet_batchsize16"])
    assert (c.data.batch_size, c.trainer.max_epochs) == (16, 200)
    c = train_cfg(["experiment=mr2ct_unet_gradient_consistency_batchsize8"])
    assert ("gc" in c.loss, c.loss.cycle.weight, c.data.batch_size, c.trainer.max_epochs) == (True, 3.0, 8, 200)
    c = train_cfg(["experiment=mr2ct_spectral"])
    assert (c.discriminator.spectral_norm, c.data.batch_size, c.trainer.max_epochs) == (True, 2, 200)
    c = train_cfg(["experiment=mr2ct_perceptual"])
    assert ("perceptual" in c.loss, c.data.batch_size) == (True, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.patch_size=[30,32,32]"], "divisible by the generator's total stride 4"),
        (["generator=resnet3d_2blk", "data.patch_size=[34,32,32]"], "divisible by the generator's total stride 4"),
        (["data.patch_size=[32,32]"], "3 positive integers"),
        (["loss.cycle.weight=-1"], "loss.cycle.weight must be >= 0"),
        (["data.batch_size=0"], "batch_size must be >= 1"),
        (["model.lr_g=0"], "model.lr_g must be > 0"),
        (["model.lr_d=-1e-4"], "model.lr_d must be > 0"),
        (["data.ct_window=[3000,-1024]"], "data.ct_window must be [low, high] HU with low < high"),
        (["data.mri_percentiles=[99.5,0.5]"], "data.mri_percentiles must be [low, high]"),
        (["data.mri_percentiles=[0.5,101]"], "data.mri_percentiles must be [low, high]"),
        (["callbacks.nonfinite_guard.max_consecutive=0"], "max_consecutive must be >= 1"),
        (["model.pool_size=-1"], "model.pool_size must be >= 0"),
        (["model.n_epochs=0", "model.n_epochs_decay=0"], "must be >= 1"),
        (["model.optimizer_state=float16"], "model.optimizer_state must be one of"),
    ],
)
def test_invalid_configs_are_refused_before_work(train_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(train_cfg(overrides))


def test_a_users_own_experiment_joins_through_config_dir():
    """README: an experiment file kept outside the package, found by --config-dir, overrides packaged groups."""
    from conftest import run_cli

    examples = Path(__file__).resolve().parents[1] / "examples" / "conf"
    res = run_cli(["mr2ct.train", "--config-dir", str(examples), "experiment=my_lab", "--cfg", "job"])
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.create(res.stdout)
    assert cfg.data._target_.endswith("NiftiDataModule") and list(cfg.data.patch_size) == [64, 64, 64]
    assert cfg.discriminator.spectral_norm is True and cfg.generator.num_res_units == 2 and cfg.tags == ["my_lab"]


def test_max_epochs_that_fights_the_schedule_is_refused_naming_the_schedule_keys(train_cfg):
    validate(train_cfg(["model.n_epochs=3", "model.n_epochs_decay=2"]))  # max_epochs follows: 5
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=7 would fight the LR schedule.*model.n_epochs / model.n_epochs_decay"):
        validate(train_cfg(["trainer.max_epochs=7"]))


def test_command_line_vocabulary():
    """Renamed keys name their successor; any Lightning Trainer argument is accepted as trainer.X."""
    from mr2ct.cli import UsageError, prepare_argv

    assert prepare_argv("train", ["x", "trainer.gradient_clip_val=1.0", "trainer.devices=2", "data.batch_size=1"]) == [
        "x", "++trainer.gradient_clip_val=1.0", "++trainer.devices=2", "data.batch_size=1"]
    with pytest.raises(UsageError, match="trainer.learning_rate is not an argument of Lightning's Trainer"):
        prepare_argv("train", ["x", "trainer.learning_rate=1"])
    with pytest.raises(UsageError, match="ckpt_path= is now ckpt="):
        prepare_argv("train", ["x", "ckpt_path=last"])
    for tool, old, new in [("augment", "in", "input"), ("augment", "out", "output"), ("translate", "ckpt_path", "ckpt")]:
        with pytest.raises(UsageError, match=f"{old}= is now {new}="):
            prepare_argv(tool, ["x", f"{old}=a"])
    assert prepare_argv("leakcheck", ["x", "train=a", "test=b"]) == ["x", "train=a", "test=b"]


def test_any_trainer_argument_reaches_lightning_from_the_command_line(tmp_path):
    from conftest import run_cli

    res = run_cli(["mr2ct.train", "trainer.detect_anomaly=true", "trainer.max_time=00:00:30:00", "--cfg", "job"])
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.create(res.stdout)
    assert cfg.trainer.detect_anomaly is True and cfg.trainer.max_time == "00:00:30:00"


def test_selection_and_early_stopping_on_bone_dice(train_cfg):
    import pytorch_lightning as pl

    cfg = train_cfg(["callbacks=select_on_dice"])
    assert cfg.callbacks.model_checkpoint.monitor == "val/dice" and cfg.callbacks.model_checkpoint.mode == "max"
    stop = instantiate(cfg.callbacks.early_stopping)
    assert isinstance(stop, pl.callbacks.EarlyStopping) and stop.monitor == "val/dice" and stop.mode == "max"
    assert "nonfinite_guard" in cfg.callbacks  # the default callbacks stay


def test_sweepers_get_the_monitored_metric(train_cfg):
    from mr2ct.train import objective

    metrics = {"val/mae": 200.0, "val/dice": 0.3}
    assert objective(train_cfg([]), metrics) == 200.0
    assert objective(train_cfg(["callbacks=select_on_dice"]), metrics) == 0.3


def test_slurm_launcher_takes_one_task_per_gpu_from_the_trainer(train_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4
    assert launcher.nodes == 2 and launcher.timeout_min == 4320
