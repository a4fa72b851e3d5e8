"""End to end through the command line, as a user runs it: default run, DDP, multirun, presets."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from conftest import AUTO_NUMERICS, run_cli, tiny

pytestmark = pytest.mark.slow


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"


def test_train_cli_prints_where_results_are(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["mr2ct.train", *tiny(), f"hydra.run.dir={run}"])
    _ok(proc)
    assert f"run folder:   {run}" in proc.stdout and "last ckpt:" in proc.stdout
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "timing.json").is_file()


def test_design_command_trains_with_ddp_on_cpu(tmp_path):
    """`generator=unet_updated loss=+spectral trainer.devices=N` on CPU processes (gloo), with the MIND term on."""
    run = tmp_path / "ddp"
    args = ["generator=unet_updated", "loss=[+spectral,mind]", "trainer.devices=2", *tiny("unet_updated"), *AUTO_NUMERICS, "data.n_train=4",
            f"hydra.run.dir={run}"]
    proc = run_cli(["mr2ct.train", *args], timeout=900)
    _ok(proc)
    # numerics=auto: rank 0 probes, the rank it launches takes its choice instead of probing again
    log = (run / "train.log").read_text() + proc.stderr + proc.stdout
    assert "chosen by local rank 0" in log, log[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mr2ct_config"]["trainer"]["precision"] in ("32-true", "bf16-mixed")
    assert ckpt["mr2ct_config"]["model"]["memory_format"] in ("contiguous", "channels_last")
    # 4 samples over 2 processes at batch 1: 2 batches per process, 2 optimizer steps each
    assert ckpt["global_step"] == 4
    assert any("parametrizations" in k for k in ckpt["state_dict"])  # spectral norm in D
    assert "mind" in ckpt["mr2ct_config"]["loss"]


def test_multirun_sweeps_each_job_into_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["mr2ct.train", "-m", *tiny(), "loss.cycle.weight=3,10", f"hydra.sweep.dir={sweep}"], timeout=900)
    _ok(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    weights = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        cfg = (job / ".hydra" / "config.yaml").read_text()
        weights.append(float(cfg.split("cycle:")[1].split("weight:")[1].split()[0]))
    assert weights == [3.0, 10.0]


PLAIN = {"adv_ab", "adv_ba", "cycle_a", "cycle_b"}


@pytest.mark.parametrize(
    "preset, generator, terms, weights_have",
    [
        ("mr2ct_new_unetUpdated", "unet_updated", PLAIN, "g_ab.encoder.0.residual."),  # residual units
        ("mr2ct_unet_batchsize16", "unet", PLAIN, None),
        ("mr2ct_unet_gradient_consistency_batchsize8", "unet", PLAIN | {"gc_ab", "gc_ba"}, None),
        ("mr2ct_spectral", "unet", PLAIN, "d_a.model.0.parametrizations.weight.original"),  # spectral norm in D
        ("mr2ct_perceptual", "unet", PLAIN | {"perc_a", "perc_b"}, None),
    ],
)
def test_experiment_presets_run_one_batch(train_cfg, tmp_path, preset, generator, terms, weights_have):
    """Each preset trains with the loss terms and the networks of the original run it reproduces."""
    from mr2ct.checkpoints import safe_torch_load
    from mr2ct.train import train

    overrides = [f"experiment={preset}", *tiny(generator), "discriminator.n_layers=2", "trainer.limit_train_batches=1"]
    if preset == "mr2ct_perceptual":
        overrides.append("loss.perceptual.pretrained=false")  # no ImageNet weights offline
    metrics = train(train_cfg(overrides))
    logged = {k.removeprefix("train/g_") for k in metrics if k.startswith("train/g_")}
    assert logged == terms and all(metrics[f"train/g_{t}"] > 0 for t in terms)
    keys = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"].keys()
    if weights_have:
        assert any(k.startswith(weights_have) for k in keys), weights_have
    assert any("residual" in k for k in keys) == (generator == "unet_updated")
    assert any("parametrizations" in k for k in keys) == (preset == "mr2ct_spectral")


def test_perceptual_preset_without_weights_file_fails_clearly(tmp_path):
    proc = run_cli(["mr2ct.train", "experiment=mr2ct_perceptual", *tiny(), f"hydra.run.dir={tmp_path / 'p'}"])
    assert proc.returncode != 0
    assert "loss.perceptual.weights_path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_submitit_launcher_runs_a_two_job_sweep_to_the_end(tmp_path):
    """hydra/launcher=local: the cluster launcher's code path (submitit), each job its own process."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["mr2ct.train", "-m", "hydra/launcher=local", *tiny(), "loss.cycle.weight=3,10", f"hydra.sweep.dir={sweep}"], timeout=900)
    _ok(proc)
    weights = []
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        weights.append(OmegaConf.load(sweep / job / ".hydra" / "config.yaml").loss.cycle.weight)
    assert sorted(weights) == [3, 10]
    assert any((sweep / ".submitit").iterdir())  # submitit's own job folders: the launcher really ran them


def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "search"
    searched_by_optuna = ("data.batch_size",)  # a command-line value would fix it and take it out of the search
    args = ["hparams_search=optuna_dice", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
            *[o for o in tiny() if not o.startswith(searched_by_optuna)],
            "trainer.check_val_every_n_epoch=1", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(["mr2ct.train", *args], timeout=900)
    _ok(proc)
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0.0 <= float(result.best_value) <= 1.0  # a bone Dice: the monitored metric, not val/mae
    assert set(result.best_params) == {"loss.cycle.weight", "loss.mind.weight", "model.lr_g", "model.lr_d", "data.batch_size"}
    assert "Best value" in proc.stdout + proc.stderr
    assert (sweep / "0" / "checkpoints").is_dir() and (sweep / "1" / "checkpoints").is_dir()
