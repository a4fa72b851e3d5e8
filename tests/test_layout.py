"""The memory format settled on the training steps (``model.memory_format=auto``): mr2ct/training/layout.py."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny
from mr2ct import numerics
from mr2ct.training import layout
from mr2ct.training.layout import LayoutTrial, layout_trial, set_layout

CL = torch.channels_last_3d


def scripted_steps(monkeypatch, seconds: dict[bool, float]) -> list[bool]:
    """Every training step takes ``seconds[channels_last]``; returns the layouts the steps ran in."""
    clock = {"t": 0.0, "calls": 0}
    ran: list[bool] = []

    def now(self, pl_module):
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:  # calls come in pairs: a step's start, then its end
            cl = bool(pl_module.channels_last)
            clock["t"] += seconds[cl]
            ran.append(cl)
        return clock["t"]

    monkeypatch.setattr(LayoutTrial, "_now", now)
    return ran


def probe_prefers(monkeypatch, channels_last: bool) -> None:
    """The start-up probe times channels-last (or contiguous) 30 % faster."""
    def fake(net, patch, device, candidates, rounds=3):
        return {k: (0.7 if k[1] == channels_last else 1.0) for k in candidates}

    monkeypatch.setattr(numerics, "time_candidates", fake)


def weights_layout(ckpt: dict) -> set[bool]:
    """Whether the checkpoint's 5-D weights are stored channels-last, per weight whose two layouts differ."""
    return {t.is_contiguous(memory_format=CL) for t in ckpt["state_dict"].values()
            if t.dim() == 5 and t.is_contiguous() != t.is_contiguous(memory_format=CL)}


@pytest.mark.parametrize("faster", [True, False])
def test_the_faster_layout_on_the_training_steps_is_kept(tmp_path, train_cfg, monkeypatch, faster):
    """The probe starts the run contiguous; the steps decide, and checkpoints, config and run_info follow."""
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=False)
    ran = scripted_steps(monkeypatch, {faster: 0.5, not faster: 1.0})
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=4", "multistart.starts=1", "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    chosen = "channels_last" if faster else "contiguous"
    assert ran == [False, True] * 4  # one untimed step in each, then three each, interleaved
    assert info["numerics"]["memory_format"] == chosen
    assert info["numerics"]["trial_seconds"] == {"contiguous": [1.0 if faster else 0.5] * 3, "channels_last": [0.5 if faster else 1.0] * 3}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mr2ct_config"]["model"]["memory_format"] == chosen
    assert weights_layout(ckpt) == {faster}
    assert OmegaConf.select(cfg, "model.memory_format") == chosen


def test_a_near_tie_keeps_the_probes_choice(tmp_path, train_cfg, monkeypatch):
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=True)
    scripted_steps(monkeypatch, {True: 1.0, False: 0.95})  # contiguous 5 % faster: under the trial's margin (7.5 %)
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=4", "multistart.starts=1", "callbacks.image_logger=null"])
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["numerics"]["memory_format"] == "channels_last"


def test_the_first_start_decides_and_the_others_are_built_in_its_choice(tmp_path, train_cfg, monkeypatch):
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=False)
    ran = scripted_steps(monkeypatch, {True: 0.5, False: 1.0})
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=8", "multistart.starts=2", "multistart.epochs=4",
                     "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    assert len(ran) == 8  # one trial, in the first start
    for start in ("seed42", "seed43"):
        ckpt = torch.load(run / "starts" / start / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["mr2ct_config"]["model"]["memory_format"] == "channels_last"
        assert weights_layout(ckpt) == {True}
    assert json.loads((run / "run_info.json").read_text())["numerics"]["memory_format"] == "channels_last"


def test_explicit_layout_several_devices_and_compiled_nets_run_no_trial(train_cfg):
    base = [*tiny(), "model.memory_format=auto"]
    assert layout_trial(train_cfg(base), True, {}) is not None
    assert layout_trial(train_cfg(base), False, {}) is None  # the user's explicit value stands
    assert layout_trial(train_cfg([*base, "trainer=ddp", "trainer.devices=2"]), True, {}) is None
    assert layout_trial(train_cfg([*base, "model.compile=true"]), True, {}) is None


def test_switching_layout_changes_no_value_of_the_optimizer_step():
    """Weights, gradients and Adam's moments converted mid-run: the next step equals the step without the switch."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.Conv3d(4, 1, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2, fused=True) for n in nets]
    x = torch.randn(1, 2, 6, 7, 8)

    def step(net, opt, inp):
        opt.zero_grad()
        net(inp).square().mean().backward()
        opt.step()

    for net, opt in zip(nets, opts):
        step(net, opt, x)  # Adam's state exists, in the contiguous layout
    net, opt = nets[1], opts[1]
    net.channels_last = False
    params = list(net.parameters())
    set_layout(net, [opt], True)
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]  # the optimizer still holds them
    weights = [p for p in params if p.dim() == 5]
    assert all(p.is_contiguous(memory_format=CL) for p in weights)
    assert all(opt.state[p][k].is_contiguous(memory_format=CL) for p in weights for k in ("exp_avg", "exp_avg_sq"))
    step(nets[0], opts[0], x)
    step(net, opt, x.contiguous(memory_format=CL))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trial_arguments_are_checked():
    with pytest.raises(ValueError):
        LayoutTrial(steps=0)
    with pytest.raises(ValueError):
        LayoutTrial(margin=1.5)
    assert layout.FORMATS == {False: "contiguous", True: "channels_last"}
