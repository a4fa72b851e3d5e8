"""Precision and memory format settled on the training steps (``auto``): mr2ct/training/numerics_trial.py."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny
from mr2ct import numerics
from mr2ct.model.cyclegan import CycleGAN
from mr2ct.training import numerics_trial
from mr2ct.training.numerics_trial import NumericsTrial, numerics_trial as make_trial, running, set_layout

CL = torch.channels_last_3d
FP32, BF16 = False, True


def scripted_steps(monkeypatch, seconds: dict[tuple[bool, bool], float]) -> list[tuple[bool, bool]]:
    """Every training step takes ``seconds[(bf16, channels_last)]``; returns the numerics the steps ran in."""
    clock = {"t": 0.0, "calls": 0}
    ran: list[tuple[bool, bool]] = []

    def now(self, pl_module):
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:  # calls come in pairs: a step's start, then its end
            numerics_now = running(pl_module.trainer, pl_module)
            clock["t"] += seconds[numerics_now]
            ran.append(numerics_now)
        return clock["t"]

    monkeypatch.setattr(NumericsTrial, "_now", now)
    return ran


def layouts(ran: list[tuple[bool, bool]]) -> list[bool]:
    assert all(not bf16 for bf16, _ in ran)
    return [cl for _, cl in ran]


def probe_prefers(monkeypatch, channels_last: bool = False, bf16: bool = False) -> None:
    """The start-up probe times the given candidate 30 % faster than every other."""
    def fake(net, patch, device, candidates, rounds=3):
        return {k: (0.7 if k == (bf16, channels_last) else 1.0) for k in candidates}

    monkeypatch.setattr(numerics, "time_candidates", fake)


def native_bf16(monkeypatch) -> None:
    """The device counts as running bf16 natively (the probe and the trial both ask)."""
    monkeypatch.setattr(numerics, "bf16_fast", lambda device: True)
    monkeypatch.setattr(numerics_trial, "bf16_fast", lambda device: True)


def weights_layout(ckpt: dict) -> set[bool]:
    """Whether the checkpoint's 5-D weights are stored channels-last, per weight whose two layouts differ."""
    return {t.is_contiguous(memory_format=CL) for t in ckpt["state_dict"].values()
            if t.dim() == 5 and t.is_contiguous() != t.is_contiguous(memory_format=CL)}


def fp32_steps(monkeypatch, seconds: dict[bool, float]) -> list[tuple[bool, bool]]:
    """fp32 steps taking ``seconds[channels_last]`` (runs with ``trainer.precision=32-true``: only the layout is tried)."""
    return scripted_steps(monkeypatch, {(FP32, cl): s for cl, s in seconds.items()})


@pytest.mark.parametrize("faster", [True, False])
def test_the_faster_layout_on_the_training_steps_is_kept(tmp_path, train_cfg, monkeypatch, faster):
    """The probe starts the run contiguous; the steps decide, and checkpoints, config and run_info follow."""
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=False)
    ran = fp32_steps(monkeypatch, {faster: 0.8, not faster: 1.0})  # within the drop factor: both run both rounds
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=6", "multistart.starts=1", "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    chosen = "channels_last" if faster else "contiguous"
    assert layouts(ran) == ([False] * 3 + [True] * 3) * 2  # two rounds of a block each: one untimed step, two timed
    assert info["numerics"]["memory_format"] == chosen
    assert info["numerics"]["trial_seconds"] == {"fp32/contiguous": [1.0 if faster else 0.8] * 4,
                                                 "fp32/channels_last": [0.8 if faster else 1.0] * 4}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mr2ct_config"]["model"]["memory_format"] == chosen
    assert weights_layout(ckpt) == {faster}
    assert OmegaConf.select(cfg, "model.memory_format") == chosen


def test_a_near_tie_keeps_the_probes_choice(tmp_path, train_cfg, monkeypatch):
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=True)
    fp32_steps(monkeypatch, {True: 1.0, False: 0.95})  # contiguous 5 % faster: under the trial's margin (7.5 %)
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=6", "multistart.starts=1", "callbacks.image_logger=null"])
    train(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["numerics"]["memory_format"] == "channels_last"


def test_the_first_start_decides_and_the_others_are_built_in_its_choice(tmp_path, train_cfg, monkeypatch):
    from mr2ct.train import train

    probe_prefers(monkeypatch, channels_last=False)
    ran = fp32_steps(monkeypatch, {True: 0.8, False: 1.0})
    cfg = train_cfg([*tiny(), "model.memory_format=auto", "model.n_epochs=8", "multistart.starts=2", "multistart.epochs=6",
                     "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    assert len(ran) == 12  # one trial, in the first start
    for start in ("seed42", "seed43"):
        ckpt = torch.load(run / "starts" / start / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["mr2ct_config"]["model"]["memory_format"] == "channels_last"
        assert weights_layout(ckpt) == {True}
    assert json.loads((run / "run_info.json").read_text())["numerics"]["memory_format"] == "channels_last"


@pytest.mark.parametrize("faster", [FP32, BF16])
def test_precision_is_settled_on_the_training_steps(tmp_path, train_cfg, monkeypatch, faster):
    """The probe picks bf16 (as on a Xeon where the whole step is slower in it); the steps decide, under real autocast."""
    from mr2ct.train import train

    native_bf16(monkeypatch)
    probe_prefers(monkeypatch, bf16=True)
    ran = scripted_steps(monkeypatch, {(faster, False): 0.8, (not faster, False): 1.0})
    autocast: list[bool] = []
    step = CycleGAN.training_step

    def recording(self, batch, batch_idx):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CycleGAN, "training_step", recording)
    cfg = train_cfg([*tiny(), "trainer.precision=auto", "model.n_epochs=8", "multistart.starts=1", "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    chosen = "bf16-mixed" if faster else "32-true"
    assert ran == ([(BF16, False)] * 3 + [(FP32, False)] * 3) * 2 and len(autocast) == 16  # the probe's choice first
    assert autocast[:12] == ([True] * 3 + [False] * 3) * 2  # the plugin swap reaches the step itself
    assert set(autocast[12:]) == {faster}  # and every step after the trial runs in the choice
    info = json.loads((run / "run_info.json").read_text())
    assert info["numerics"]["precision"] == chosen and info["numerics"]["memory_format"] == "contiguous"
    assert info["numerics"]["trial_seconds"] == {"bf16/contiguous": [0.8 if faster else 1.0] * 4,
                                                 "fp32/contiguous": [1.0 if faster else 0.8] * 4}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mr2ct_config"]["trainer"]["precision"] == chosen
    assert OmegaConf.select(cfg, "trainer.precision") == chosen


def test_both_auto_tries_four_candidates_and_keeps_the_fastest(tmp_path, train_cfg, monkeypatch):
    """Four candidates in the first round; those over 1.5x the best step sit out the second (the start among them)."""
    from mr2ct.train import train

    native_bf16(monkeypatch)
    probe_prefers(monkeypatch, bf16=True, channels_last=False)
    seconds = {(BF16, False): 2.0, (BF16, True): 0.8, (FP32, False): 1.2, (FP32, True): 0.6}
    ran = scripted_steps(monkeypatch, seconds)
    cfg = train_cfg([*tiny(), "trainer.precision=auto", "model.memory_format=auto", "model.n_epochs=13", "multistart.starts=1",
                     "callbacks.image_logger=null"])
    train(cfg)
    first = [(BF16, False), (BF16, True), (FP32, False), (FP32, True)]
    second = [(BF16, True), (FP32, True)]  # within 1.5 x 0.6 s
    assert ran == [c for c in first for _ in range(3)] + [c for c in second for _ in range(3)]  # 18 steps, not 24
    numerics_info = json.loads((tmp_path / "run" / "run_info.json").read_text())["numerics"]
    assert (numerics_info["precision"], numerics_info["memory_format"]) == ("32-true", "channels_last")
    assert numerics_info["trial_seconds"] == {"bf16/contiguous": [2.0] * 2, "bf16/channels_last": [0.8] * 4,
                                              "fp32/contiguous": [1.2] * 2, "fp32/channels_last": [0.6] * 4}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert weights_layout(ckpt) == {True}


def test_no_candidate_is_dropped_within_the_drop_factor(monkeypatch):
    """The schedule grows round by round: a candidate within ``drop`` times the best runs every round, one beyond it only the first."""
    trial = NumericsTrial(precision=True, layout=True, drop=2.0)
    trial.candidates = [(BF16, False), (BF16, True), (FP32, False), (FP32, True)]
    trial.seconds = {c: [] for c in trial.candidates}
    assert trial._next_round() and len(trial.schedule) == 12
    trial.seconds = {(BF16, False): [2.0], (BF16, True): [1.4], (FP32, False): [1.0], (FP32, True): [0.9]}
    assert trial._next_round() and [c for c, _ in trial.schedule[12:]] == [c for c in [(BF16, True), (FP32, False), (FP32, True)] for _ in range(3)]
    assert not trial._next_round()  # two rounds


def test_what_is_tried(train_cfg, monkeypatch):
    """Only what was auto; precision only where bf16 is native; no trial for several devices or compiled nets."""
    base = [*tiny(), "trainer.precision=auto", "model.memory_format=auto"]
    monkeypatch.setattr(numerics_trial, "bf16_fast", lambda device: False)
    trial = make_trial(train_cfg(base), True, True, {})
    assert (trial.precision, trial.layout) == (False, True)
    assert numerics_trial.trial_axes(train_cfg(base), True, True) == {"precision": False, "layout": True}  # what the benchmark passes on
    assert make_trial(train_cfg(base), True, False, {}) is None  # the user's explicit layout stands; bf16 emulated
    monkeypatch.setattr(numerics_trial, "bf16_fast", lambda device: True)
    trial = make_trial(train_cfg(base), True, False, {})
    assert (trial.precision, trial.layout, trial.trial_steps) == (True, False, 12)
    assert make_trial(train_cfg(base), True, True, {}).trial_steps == 24
    assert make_trial(train_cfg(base), False, False, {}) is None
    assert make_trial(train_cfg([*base, "trainer=ddp", "trainer.devices=2"]), True, True, {}) is None
    assert make_trial(train_cfg([*base, "model.compile=true"]), True, True, {}) is None
    # the activation savers asked for memory: the probe's choice stands (the trial's steps would raise the peak)
    assert make_trial(train_cfg([*base, "model.split_backward=true"]), True, True, {}) is None
    assert make_trial(train_cfg([*base, "generator.checkpointing=true"]), True, True, {}) is None
    assert make_trial(train_cfg([*base, "model.optimizer_state=bfloat16"]), True, True, {}) is not None


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
        NumericsTrial(steps=0)
    with pytest.raises(ValueError):
        NumericsTrial(margin=1.5)
    with pytest.raises(ValueError):
        NumericsTrial(rounds=0)
    with pytest.raises(ValueError):
        NumericsTrial(precision=False, layout=False)
    with pytest.raises(ValueError):
        NumericsTrial(drop=0.9)
    assert numerics_trial.FORMATS == {False: "contiguous", True: "channels_last"}


def test_the_benchmark_times_the_steps_after_a_trial_that_ended_early(monkeypatch, tmp_path):
    """profiling.measure runs the trial as train does; when a candidate is dropped the trial is shorter, and the
    timed steps are the ones after it, in its choice, as many as asked."""
    import importlib

    measure = importlib.import_module("mr2ct.profiling.measure")  # the module (the package exports its function of that name)

    monkeypatch.setattr(numerics_trial, "bf16_fast", lambda device: False)
    fp32_steps(monkeypatch, {False: 1.0, True: 0.4})  # contiguous 2.5x slower: it sits out the second round
    overrides = [*tiny(), "trainer.precision=32-true", "model.memory_format=contiguous", "data.patch_size=[16,16,16]",
                 f"paths.output_dir={tmp_path}"]
    out = measure._measure_train(overrides, steps=3, threads=1, trial={"precision": False, "layout": True})
    assert out["trial_seconds"] == {"fp32/contiguous": [1.0] * 2, "fp32/channels_last": [0.4] * 4}
    assert out["memory_format"] == "channels_last" and out["steps"] == 3
    assert out["pool_images"] == 9 + 3  # 9 trial steps (not 12), then the 3 timed: the fit stopped there
