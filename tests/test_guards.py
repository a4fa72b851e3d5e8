"""Numerical guards: NaN/Inf losses or gradients are skipped, counted, and stop a run when they persist."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny
from mr2ct.checkpoints import safe_torch_load
from mr2ct.model import CycleGAN
from mr2ct.train import train
from mr2ct.training.nonfinite import NonFiniteError, NonFiniteGuard


def inject_nan(monkeypatch, when):
    """Make the generator's ``cycle_a`` term NaN on the batches where ``when(module)`` is true."""
    original = CycleGAN.generator_losses

    def patched(self, *args, **kwargs):
        terms, fake_a, fake_b = original(self, *args, **kwargs)
        if "cycle_a" in terms and when(self):
            terms["cycle_a"] = terms["cycle_a"] * float("nan")
        return terms, fake_a, fake_b

    monkeypatch.setattr(CycleGAN, "generator_losses", patched)


def all_finite(state_dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def test_persistent_nan_stops_training_and_keeps_last_good_checkpoint(train_cfg, tmp_path, monkeypatch):
    inject_nan(monkeypatch, lambda m: m.current_epoch >= 1)
    cfg = train_cfg([*tiny(), "data.n_train=4", "model.n_epochs=2", "callbacks.nonfinite_guard.max_consecutive=3"])
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    msg = str(err.value)
    # epoch 0: 4 batches x 2 optimizer steps; the third bad batch of epoch 1 stops the run
    assert "loss term g_cycle_a" in msg and "at step 8" in msg and "3 bad batches in a row" in msg, msg
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"last good checkpoint: {last}" in msg
    ckpt = safe_torch_load(last)
    assert ckpt["global_step"] == 8 and all_finite(ckpt["state_dict"])


def test_isolated_nan_batch_is_skipped_and_training_continues(train_cfg, tmp_path, monkeypatch):
    calls = {"n": 0}

    def second_batch(module):
        calls["n"] += 1
        return calls["n"] == 2

    inject_nan(monkeypatch, second_batch)
    metrics = train(train_cfg([*tiny(), "data.n_train=4"]))
    ckpt = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == (4 - 1) * 2  # the bad batch made no optimizer step
    assert all_finite(ckpt["state_dict"])
    assert metrics["guard/skipped"] == 1


def test_nonfinite_gradient_with_finite_loss_is_named():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = NonFiniteGuard(max_consecutive=2)
    guard._names = {id(p): f"g_ab.{n}" for n, p in net.named_parameters()}

    class Trainer:  # what ok() reads of a pl.Trainer
        global_step, current_epoch = 5, 0

        class fit_loop:
            class epoch_loop:
                batch_idx = 1

    loss = net(torch.ones(1, 2)).sum()
    loss.backward()
    assert guard.ok(Trainer, {"cycle_a": loss}, opt)
    net.bias.grad[0] = float("inf")
    assert not guard.ok(Trainer, {"cycle_a": loss}, opt)
    assert guard._bad_in_batch == "gradient of g_ab.bias (losses finite)" and guard.skipped == 1
    with pytest.raises(ValueError):
        NonFiniteGuard(max_consecutive=0)


@pytest.mark.parametrize("where", ["g", "d"])
def test_skipped_batch_leaves_weights_adam_moments_and_pools_untouched(train_cfg, monkeypatch, where):
    """A NaN in the G (or D) loss at batch 3: that batch changes no weight, no Adam moment, no history pool."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    bad_batch = 3
    if where == "g":
        inject_nan(monkeypatch, lambda m: m.trainer.fit_loop.epoch_loop.batch_idx == bad_batch)
    else:
        original = CycleGAN.discriminator_losses

        def patched(self, *args, **kwargs):
            terms = original(self, *args, **kwargs)
            if self.trainer.fit_loop.epoch_loop.batch_idx == bad_batch:
                terms["d_a"] = terms["d_a"] * float("nan")
            return terms

        monkeypatch.setattr(CycleGAN, "discriminator_losses", patched)

    snapshots = {}

    def snapshot(module: CycleGAN) -> dict:
        opt_g, opt_d = module.optimizers()
        moments = {f"{name}.{i}": v.clone() for name, opt in (("g", opt_g), ("d", opt_d))
                   for i, st in enumerate(opt.optimizer.state.values()) for v in (st["exp_avg"], st["exp_avg_sq"])}
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        pools = [p.clone() for pool in (module.pool_a, module.pool_b) for p in pool.images]
        return {"weights": weights, "moments": moments, "pools": pools}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == bad_batch:
                snapshots["before"] = snapshot(module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == bad_batch:
                snapshots["after"] = snapshot(module)

    cfg = train_cfg([*tiny(), "data.n_train=6", "model.pool_size=50", "callbacks.image_logger.every_n_batches=100"])
    from mr2ct.train import train as run_train

    monkeypatch.setattr("mr2ct.train.hydra.utils.instantiate", _with_callback(instantiate, Watch()))
    run_train(cfg)
    before, after = snapshots["before"], snapshots["after"]
    assert before["moments"] and len(before["pools"]) == 2 * bad_batch  # steps were taken and pools filled before
    # a NaN in the D loss comes after the (finite) G step: then the discriminators' side must be untouched
    mine = (lambda k: True) if where == "g" else (lambda k: k.startswith(("d_", "d.")))
    for key in ("weights", "moments"):
        changed = [k for k in before[key] if mine(k) and not torch.equal(before[key][k], after[key][k])]
        assert not changed, f"{key} changed on a skipped batch: {changed[:4]}"
    assert len(after["pools"]) == len(before["pools"]) and all(torch.equal(a, b) for a, b in zip(before["pools"], after["pools"]))


def _with_callback(instantiate, callback):
    """``hydra.utils.instantiate`` that adds ``callback`` to the Trainer it builds."""

    def wrapped(config, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], callback]
        return instantiate(config, *args, **kwargs)

    return wrapped


def test_persistent_nan_exits_3_with_one_line_naming_the_term(monkeypatch, tmp_path, capsys):
    """The command line: exit code 3 (not 1, not 2) and one `mr2ct: error:` line naming the loss term."""
    from test_bad_input import run_main

    inject_nan(monkeypatch, lambda m: True)
    args = [*tiny(), "data.n_train=2", "callbacks.nonfinite_guard.max_consecutive=2", f"hydra.run.dir={tmp_path / 'run'}"]
    code, err = run_main("train", args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("mr2ct: error:")]
    assert code == 3 and len(lines) == 1 and "loss term g_cycle_a" in lines[0] and "Traceback" not in err, err[-2000:]


def test_rng_states_saved_in_a_checkpoint_are_the_ones_restored():
    """Python, numpy and torch draws after a restore repeat the draws made right after the save."""
    import random

    import numpy as np

    from mr2ct.training.resume import RngStateCheckpoint

    cb, checkpoint = RngStateCheckpoint(), {}
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    cb.on_save_checkpoint(None, None, checkpoint)
    after_save = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # a new launch draws something else
    cb.on_load_checkpoint(None, None, checkpoint)
    after_load = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after_save[0], after_load[0]) and np.array_equal(after_save[1], after_load[1]) and after_save[2] == after_load[2]


def test_training_checkpoints_go_through_the_safe_checkpoint_io(train_cfg, tmp_path, monkeypatch):
    """Every checkpoint Lightning writes in a fit is written atomically, every resume read is weights-only."""
    import mr2ct.training.checkpointing as guards

    written, read = [], []
    save, load = guards.atomic_torch_save, guards.safe_torch_load
    monkeypatch.setattr(guards, "atomic_torch_save", lambda obj, path: written.append(str(path)) or save(obj, path))
    monkeypatch.setattr(guards, "safe_torch_load", lambda path, **kw: read.append(str(path)) or load(path, **kw))
    train(train_cfg(tiny()))
    assert any(p.endswith("last.ckpt") for p in written)
    train(train_cfg([*tiny(), "model.n_epochs=2", "ckpt=last"]))
    assert any(p.endswith("last.ckpt") for p in read)
