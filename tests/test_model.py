"""The CycleGAN LightningModule: schedule, pool, step structure, one-batch fits, resume."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny
from mr2ct.model import ImagePool, linear_decay
from mr2ct.train import train


def test_linear_decay_schedule_values():
    f = linear_decay(n_epochs=3, n_epochs_decay=2)
    assert [f(e) for e in range(6)] == pytest.approx([1, 1, 1, 2 / 3, 1 / 3, 0])
    # the original runs: 100 epochs with decay from 75
    g = linear_decay(75, 25)
    assert g(74) == 1 and g(75) == pytest.approx(25 / 26) and g(99) == pytest.approx(1 / 26) and g(100) == 0


def test_image_pool_mixes_history():
    torch.manual_seed(0)
    pool = ImagePool(size=3)
    first = [pool.query(torch.full((1, 1, 2, 2, 2), float(i))) for i in range(3)]
    assert [float(t.mean()) for t in first] == [0, 1, 2]  # filling: returned unchanged
    outs = {float(pool.query(torch.full((1, 1, 2, 2, 2), 9.0)).mean()) for _ in range(40)}
    assert 9.0 in outs and outs & {0.0, 1.0, 2.0}  # some new, some remembered
    state = pool.state_dict()
    other = ImagePool(0)
    other.load_state_dict(state)
    assert other.size == 3 and all(torch.equal(a, b) for a, b in zip(other.images, pool.images))
    assert torch.equal(ImagePool(0).query(torch.ones(2, 1, 2, 2, 2)), torch.ones(2, 1, 2, 2, 2))


def test_image_pool_answers_in_the_querys_dtype():
    """Fakes stored by bf16 steps (the numerics trial, a resumed bf16 run) come back as fp32 to an fp32 step."""
    torch.manual_seed(0)
    pool = ImagePool(size=2)
    for _ in range(2):
        pool.query(torch.ones(1, 1, 2, 2, 2, dtype=torch.bfloat16))
    outs = [pool.query(torch.zeros(2, 1, 2, 2, 2)) for _ in range(10)]
    assert all(o.dtype == torch.float32 for o in outs)
    assert any(float(o.max()) == 1.0 for o in outs)  # remembered bf16 fakes among them


@pytest.mark.parametrize("loss, passes", [("default", 2), ("+identity", 3)])
def test_training_step_reuses_fakes_and_updates_all_nets(train_cfg, loss, passes):
    """One step = 4 generator passes (+2 identity), no recomputation of fakes for the D update."""
    cfg = train_cfg([*tiny("unet"), f"loss={loss}"])
    model = instantiate(cfg.model, _convert_="partial")
    calls = {"g_ab": 0, "g_ba": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    before = {n: [p.detach().clone() for p in getattr(model, n).parameters()] for n in ("g_ab", "g_ba", "d_a", "d_b")}
    import pytorch_lightning as pl

    dm = instantiate(cfg.data)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert calls == {"g_ab": passes, "g_ba": passes}  # fake_b, rec_b (, idt) ; fake_a, rec_a (, idt)
    for name, params in before.items():
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(params, getattr(model, name).parameters())), name
    assert trainer.global_step == 2  # two optimizer steps per batch
    # gradients are released right after each step: none is held between steps (memory)
    assert all(p.grad is None for p in model.parameters())
    opt_g, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    assert opt_g.defaults["fused"] and opt_d.defaults["fused"]  # no whole-group temporaries at the step


@pytest.mark.parametrize("generator", ["unet", "unet_updated", "resnet3d_2blk", "resnet3d_9blk"])
def test_one_batch_fit_each_generator(train_cfg, generator, tmp_path):
    cfg = train_cfg([f"generator={generator}", *tiny(generator), "trainer.limit_train_batches=1"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/mae"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("loss", ["+gc", "+perceptual", "+spectral", "[+gc,+perceptual,spectral]"])
def test_one_batch_fit_each_loss_add_on(train_cfg, loss):
    cfg = train_cfg([f"loss={loss}", *tiny(), "trainer.limit_train_batches=1", "loss.perceptual.slice_fraction=0.25"] if "perceptual" in loss else [f"loss={loss}", *tiny(), "trainer.limit_train_batches=1"])
    metrics = train(cfg)
    assert metrics["train/loss_g"] > 0
    if "gc" in loss:
        assert "train/g_gc_ab" in metrics
    if "perceptual" in loss:
        assert "train/g_perc_a" in metrics


def test_tensorboard_holds_losses_lrs_and_images(train_cfg, tmp_path):
    cfg = train_cfg([*tiny(), "loss=[+gc,identity,mind]"])
    train(cfg)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ["train/g_adv_ab", "train/g_adv_ba", "train/g_cycle_a", "train/g_cycle_b", "train/g_idt_a", "train/g_gc_ab", "train/g_mind_ab",
                "train/d_a", "train/d_b", "lr/g", "lr/d", "val/mae", "time/epoch_s"]:
        assert tag in scalars, (tag, scalars)
    images = acc.Tags()["images"]
    assert images, "no slice images logged"
    img = acc.Images(images[0])[0]
    assert img.height >= 6 * 16 and img.width >= 3 * 16  # 6 rows (a, fake b, rec a, b, fake a, rec b) x 3 views
    assert (tmp_path / "run" / "timing.json").is_file() and (tmp_path / "run" / "run_info.json").is_file()


def test_resume_continues_at_same_step_and_learning_rate(train_cfg, tmp_path):
    base = [*tiny(), "model.n_epochs=1", "model.n_epochs_decay=2", "trainer.limit_train_batches=2"]
    train(train_cfg([*base, "trainer.max_steps=8"]))  # stop after two of the three epochs (2 batches x 2 steps each)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 2 * 2
    assert "image_pools" in ckpt and len(ckpt["image_pools"]["a"]["images"]) > 0
    metrics = train(train_cfg([*base, "ckpt=last"]))  # max_epochs = 3 from the schedule
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 3 * 2 * 2
    # the third epoch (index 2) of a 1 + 2 schedule runs at 1/3 of the base LR
    assert metrics["lr/g"] == pytest.approx(2e-4 / 3)


def test_bf16_optimizer_state_trains_checkpoints_and_resumes_either_way(train_cfg, tmp_path):
    """The optimizer-state saver can be switched on or off at a resume (e.g. after running out of memory)."""
    base = [*tiny(), "model.n_epochs=2", "model.n_epochs_decay=0", "trainer.limit_train_batches=1"]
    train(train_cfg([*base, "trainer.max_steps=2", "model.optimizer_state=bfloat16"]))  # one of the two epochs
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    def moment_dtypes() -> set[torch.dtype]:
        ckpt = torch.load(last, weights_only=False)
        return {s[k].dtype for opt in ckpt["optimizer_states"] for s in opt["state"].values() for k in ("exp_avg", "exp_avg_sq")}

    assert moment_dtypes() == {torch.bfloat16}
    train(train_cfg([*base, "ckpt=last"]))  # back to PyTorch's fp32 Adam
    assert moment_dtypes() == {torch.float32}
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 2 * 2
    assert all(g["fused"] for opt in ckpt["optimizer_states"] for g in opt["param_groups"])  # fused kernel again


def test_csv_and_mlflow_loggers_hold_losses_validation_and_config(train_cfg, tmp_path):
    cfg = train_cfg([*tiny(), "logger=[csv,mlflow]", "callbacks.image_logger.every_n_batches=1"])
    train(cfg)
    csv_text = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/loss_g" in csv_text.splitlines()[0] and "val/mae" in csv_text.splitlines()[0]
    assert "generator/channels" in (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mr2ct").experiment_id])
    assert {"train/loss_g", "val/mae"} <= set(run.data.metrics) and run.data.params["loss/cycle/weight"] == "10.0"
    assert any((tmp_path / "mlartifacts").rglob("*.png"))  # the slice images, as MLflow artifacts


def test_test_true_scores_the_best_checkpoint_on_the_test_split_and_logs_it(train_cfg, tmp_path):
    metrics = train(train_cfg([*tiny(), "test=true", "logger=csv"]))
    assert {"test/mae", "test/dice", "test/ssim"} <= set(metrics) and 0.0 <= metrics["test/dice"] <= 1.0
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "test/mae" in header  # the final test metrics reach the logger too


@pytest.mark.parametrize("generator", ["unet", "unet_updated"])  # the second: a residual path after the output conv
def test_body_median_output_init_starts_each_generator_at_its_target_domains_body_level(train_cfg, generator):
    """``model.output_init=body_median``: before any step, G_ab writes the CT body median and G_ba the MRI's."""
    import pytorch_lightning as pl

    cfg = train_cfg([f"generator={generator}", *tiny(generator), "model.output_init=body_median", "model.output_init_samples=4"])
    model, dm = instantiate(cfg.model, _convert_="partial"), instantiate(cfg.data)
    x = torch.zeros(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert abs(model.g_ab(x).mean()) < 0.05  # the CycleGAN init alone: the middle of the window
    trainer = pl.Trainer(max_steps=0, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    levels = model.output_levels
    # air is left out: the CT body median is soft tissue (-0.47 = 40 HU), far from the patches' overall median
    assert -0.6 < levels["b"] < -0.35 and levels["a"] > -0.9
    sample = dm.datasets["train"][0]
    sample = sample[0] if isinstance(sample, list) else sample
    with torch.no_grad():
        out_b, out_a = model.g_ab(torch.as_tensor(sample["a"])[None]), model.g_ba(torch.as_tensor(sample["b"])[None])
    assert abs(out_b.mean().item() - levels["b"]) < 0.1 and abs(out_a.mean().item() - levels["a"]) < 0.1


def test_output_init_is_validated(train_cfg):
    with pytest.raises(Exception, match="output_init"):
        instantiate(train_cfg([*tiny(), "model.output_init=mean"]).model, _convert_="partial")
