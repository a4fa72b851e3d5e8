"""The early warning when trainer.max_time will cut the LR schedule short (mr2ct.training.budget)."""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import pytest

from conftest import tiny
from mr2ct.training.budget import ScheduleBudget, forecast
from mr2ct.train import train


def test_forecast_where_the_run_stops():
    assert forecast(60, 40, epochs_done=10, seconds_per_epoch=10.0, seconds_left=900.0) is None  # 90 epochs in 900 s
    f = forecast(60, 40, epochs_done=10, seconds_per_epoch=10.0, seconds_left=600.0)
    assert f["stop_epoch"] == 70 and f["total_epochs"] == 100 and f["need_s"] == 900.0
    assert f["lr_factor"] == pytest.approx(30 / 41)  # 10 decay epochs of 40 done


@pytest.mark.parametrize("max_time", ["00:00:05:00", "01:00:00:00"])
def test_a_run_the_budget_will_cut_is_told_where_it_stops(train_cfg, monkeypatch, max_time):
    """Epochs timed at 100 s (a fake clock) against a 5-minute budget: after 2 epochs the 4 left need 400 s, so
    the run is told it stops after epoch 4 of 6 and which patches per epoch would end in time; a day is enough."""
    clock = itertools.count(0.0, 100.0)
    monkeypatch.setattr("mr2ct.training.budget.time", SimpleNamespace(monotonic=lambda: next(clock)))
    cfg = train_cfg([*tiny(), "model.n_epochs=4", "model.n_epochs_decay=2", "data.patches_per_epoch=2", "multistart.starts=1",
                     f"trainer.max_time={max_time}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    told = [str(w.message) for w in caught if "trainer.max_time will stop" in str(w.message)]
    if max_time.startswith("00"):
        assert len(told) == 1, told
        assert "about epoch 4 of 6" in told[0] and "learning rate still at 0.67" in told[0]
        assert "data.patches_per_epoch=0" not in told[0] and "data.patches_per_epoch=1 (now 2)" in told[0]  # 6 x 100 s at 2 patches
    else:
        assert told == []


@pytest.mark.parametrize("max_epochs, timer, forecast_made", [(-1, True, True), (5, True, False), (-1, False, False)])
def test_only_whole_schedules_under_a_budget_are_forecast(monkeypatch, max_epochs, timer, forecast_made):
    """A multistart start (max_epochs below the schedule) and a run without max_time get no forecast."""
    from pytorch_lightning.callbacks import Timer

    clock = itertools.count(0.0, 100.0)
    monkeypatch.setattr("mr2ct.training.budget.time", SimpleNamespace(monotonic=lambda: next(clock)))
    trainer = SimpleNamespace(check_val_every_n_epoch=1, callbacks=[Timer(duration="00:00:05:00")] if timer else [], current_epoch=1,
                              max_epochs=max_epochs, max_steps=-1, datamodule=None)
    cb = ScheduleBudget()
    for _ in range(2):
        cb.on_train_epoch_end(trainer, SimpleNamespace(hparams={"n_epochs": 4, "n_epochs_decay": 2}))
    assert (cb.forecast is not None) == forecast_made


def test_a_fitted_schedule_ends_in_the_time_left_and_never_raises_the_rate():
    from mr2ct.model.cyclegan import linear_decay
    from mr2ct.training.budget import fitted_schedule

    assert fitted_schedule(60, 40, epochs_done=10, seconds_per_epoch=10.0, seconds_left=1000.0) == (60, 40)  # 90 of 95 fit
    assert fitted_schedule(60, 40, epochs_done=10, seconds_per_epoch=10.0, seconds_left=600.0) == (40, 27)  # 57 epochs fit
    for done, left in itertools.product([1, 10, 59, 60, 75, 99], [0.0, 10.0, 300.0, 600.0, 5000.0]):
        n, d = fitted_schedule(60, 40, done, 10.0, left)
        assert n + d <= max(done + 1, done + left // 10.0) or (n, d) == (60, 40)
        assert linear_decay(n, d)(done) <= linear_decay(60, 40)(done) + 1e-12, (done, left)
        assert linear_decay(n, d)(n + d) == 0.0


def test_fit_shortens_the_run_so_the_rate_reaches_zero_within_the_budget(train_cfg, monkeypatch):
    """The run above (6 epochs timed at 100 s, a 5-minute budget) with fit: after 2 epochs, 2 more fit, so the
    schedule becomes 3 constant + 1 decaying epochs; the run stops after epoch 4 with the rate at zero."""
    import torch

    clock = itertools.count(0.0, 100.0)
    monkeypatch.setattr("mr2ct.training.budget.time", SimpleNamespace(monotonic=lambda: next(clock)))
    cfg_overrides = [*tiny(), "model.n_epochs=4", "model.n_epochs_decay=2", "data.patches_per_epoch=2", "multistart.starts=1",
                     "trainer.max_time=00:00:05:00", "callbacks.schedule_budget.fit=true"]
    cfg = train_cfg(cfg_overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    told = [str(w.message) for w in caught if "schedule fitted" in str(w.message)]
    assert len(told) == 1 and "6 epochs -> 4 (constant rate to epoch 3, then decay over 1)" in told[0], told
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 3  # 0-based: four epochs ran, not six
    assert (ckpt["hyper_parameters"]["n_epochs"], ckpt["hyper_parameters"]["n_epochs_decay"]) == (3, 1)
    assert all(s["_last_lr"] == [0.0] for s in ckpt["lr_schedulers"])
    # resumed, the run keeps its fitted schedule: it is complete, where the config's 6 epochs would train 2 more
    steps = ckpt["global_step"]
    train(train_cfg([*cfg_overrides, "ckpt=last"]))
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == steps and ckpt["hyper_parameters"]["n_epochs"] == 3
    # a resume that asks for another schedule gets it, as any resume does: 2 + 6 epochs, 4 more to train
    train(train_cfg([*cfg_overrides, "ckpt=last", "model.n_epochs=2", "model.n_epochs_decay=6", "trainer.max_time=null"]))
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 * steps and ckpt["hyper_parameters"]["n_epochs_decay"] == 6


def test_under_ddp_every_rank_fits_the_schedule_from_rank_zeros_timing(monkeypatch):
    """A rank whose own clock says the schedule fits (1 s an epoch) follows rank 0 (100 s an epoch, 5 minutes
    left): the ranks must stop at the same epoch, or the last collective hangs."""
    from pytorch_lightning.callbacks import Timer

    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr("mr2ct.training.budget.time", SimpleNamespace(monotonic=lambda: next(clock)))
    rank0 = (forecast(4, 2, 2, 100.0, 300.0), 100.0)
    sent = []
    scheduler = SimpleNamespace(lr_lambdas=[None])
    trainer = SimpleNamespace(check_val_every_n_epoch=1, callbacks=[Timer(duration="00:00:05:00")], current_epoch=1, max_epochs=-1,
                              max_steps=-1, datamodule=None, fit_loop=SimpleNamespace(max_epochs=6),
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
                              strategy=SimpleNamespace(broadcast=lambda obj, src: sent.append((obj, src)) or rank0))
    module = SimpleNamespace(hparams={"n_epochs": 4, "n_epochs_decay": 2})
    cb = ScheduleBudget(fit=True)
    for _ in range(2):
        cb.on_train_epoch_end(trainer, module)
    assert sent and sent[0][0][0] is None and sent[0][1] == 0  # this rank's own forecast: it fits
    assert trainer.fit_loop.max_epochs == 4 and module.hparams == {"n_epochs": 3, "n_epochs_decay": 1}
    assert scheduler.lr_lambdas[0](3) == 0.5 and scheduler.lr_lambdas[0](4) == 0.0


def test_a_run_fitted_twice_resumes_from_its_last_fit():
    """Fitted (4 + 2 -> 3 + 1), resumed, fitted again (-> 2 + 1): a second resume of the same config applies 2 + 1."""
    def fake() -> tuple[SimpleNamespace, SimpleNamespace]:
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=6),
                                  lr_scheduler_configs=[SimpleNamespace(scheduler=SimpleNamespace(lr_lambdas=[None]))])
        return trainer, SimpleNamespace(hparams={"n_epochs": 4, "n_epochs_decay": 2})

    first = ScheduleBudget(fit=True)
    first.load_state_dict({"fitted": [3, 1], "fitted_from": [4, 2]})
    trainer, module = fake()
    first.on_train_start(trainer, module)
    assert trainer.fit_loop.max_epochs == 4
    first.forecast = {"need_s": 60.0, "left_s": 30.0}
    first._shorten(trainer, module, (2, 1))
    second = ScheduleBudget(fit=True)
    second.load_state_dict(first.state_dict())
    trainer, module = fake()
    second.on_train_start(trainer, module)
    assert trainer.fit_loop.max_epochs == 3 and module.hparams == {"n_epochs": 2, "n_epochs_decay": 1}
