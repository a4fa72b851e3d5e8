"""The weights' moving average (callbacks.ema): what checkpoints hold and what a resumed run continues; off, nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from mr2ct.checkpoints import safe_torch_load
from mr2ct.model import CycleGAN
from mr2ct.train import train
from mr2ct.training.averaging import ema_decay

KEY = "g_ab.encoder.0.conv.weight"


def test_decay_warms_up_to_its_target():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999


def test_ema_run_checkpoints_the_average_and_a_resumed_run_continues_the_raw_weights(train_cfg, tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(CycleGAN, "on_train_batch_end", lambda self, *a: seen.append(self.state_dict()[KEY].detach().clone()))
    # no validation in the last epoch: last.ckpt is written when fitting ends
    base = [*tiny(), "data.n_train=3", "model.n_epochs_decay=0", "trainer.check_val_every_n_epoch=2", "callbacks.ema.enabled=true"]
    train(train_cfg([*base, "model.n_epochs=3"]))
    ckpt = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert len(seen) == 9 and int(ckpt["averaging_state"]["n_averaged"]) == 9
    # the average of the raw weights after each batch, with the warm-up decay
    expected = seen[0]
    for n, w in enumerate(seen[1:], start=1):
        d = ema_decay(0.999, n)
        expected = d * expected + (1 - d) * w
    assert torch.allclose(ckpt["state_dict"][KEY], expected, atol=1e-7)
    assert torch.equal(ckpt["current_model_state"][KEY], seen[-1])
    assert not torch.allclose(ckpt["state_dict"][KEY], seen[-1])

    started: list[torch.Tensor] = []
    original = CycleGAN.on_train_start

    def on_train_start(self):
        started.append(self.state_dict()[KEY].detach().clone())
        original(self)

    monkeypatch.setattr(CycleGAN, "on_train_start", on_train_start)
    train(train_cfg([*base, "model.n_epochs=4", "ckpt=last"]))
    assert torch.equal(started[0], seen[8])  # training goes on from the raw weights, not from the average
    resumed = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert int(resumed["averaging_state"]["n_averaged"]) == 12  # and the average from where it was


def test_disabled_average_leaves_plain_checkpoints(train_cfg, tmp_path):
    train(train_cfg([*tiny(), "callbacks.ema.enabled=false"]))
    ckpt = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert "current_model_state" not in ckpt and "averaging_state" not in ckpt
