"""trainer.precision=auto / model.memory_format=auto: the probe's choice, explicit values, DDP ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import AUTO_NUMERICS, tiny
from mr2ct import numerics
from mr2ct.nets import UNetGenerator


def tiny_net() -> torch.nn.Module:
    return UNetGenerator(in_channels=1, out_channels=1, channels=[4, 8, 16], strides=[2, 2])


def scripted(monkeypatch, times: dict[tuple[bool, bool], float], bf16_native: bool = True) -> list:
    """Make the probe report ``times`` per (bf16, channels_last); returns the list of candidates timed."""
    timed = []

    def fake(net, patch, device, candidates, rounds=3):
        timed.extend(candidates)
        return {k: times[k] for k in candidates}

    monkeypatch.setattr(numerics, "time_candidates", fake)
    monkeypatch.setattr(numerics, "bf16_fast", lambda device: bf16_native)
    return timed


@pytest.mark.parametrize(
    "times, expected",
    [
        # bf16 clearly faster, channels-last a near-tie on top of it: bf16, contiguous (the plainer of the two)
        ({(False, False): 1.0, (True, False): 0.47, (False, True): 1.03, (True, True): 0.45}, ("bf16-mixed", "contiguous")),
        # nothing clearly faster than fp32/contiguous: keep it
        ({(False, False): 1.0, (True, False): 0.9, (False, True): 0.95, (True, True): 0.92}, ("32-true", "contiguous")),
        # channels-last clearly faster, bf16 slower
        ({(False, False): 1.0, (True, False): 3.0, (False, True): 0.6, (True, True): 2.0}, ("32-true", "channels_last")),
        # both together clearly fastest
        ({(False, False): 1.0, (True, False): 0.7, (False, True): 0.7, (True, True): 0.4}, ("bf16-mixed", "channels_last")),
    ],
)
def test_choose_keeps_the_plainest_candidate_close_to_the_fastest(monkeypatch, times, expected):
    scripted(monkeypatch, times)
    got = numerics.choose(tiny_net, [16, 16, 16], torch.device("cpu"))
    assert (got.precision, got.memory_format) == expected
    assert len(got.seconds) == 4


def test_bf16_is_never_tried_where_it_is_not_native(monkeypatch):
    timed = scripted(monkeypatch, {(False, False): 1.0, (False, True): 0.99, (True, False): 0.01, (True, True): 0.01}, bf16_native=False)
    got = numerics.choose(tiny_net, [16, 16, 16], torch.device("cpu"))
    assert got.precision == "32-true" and all(not bf16 for bf16, _ in timed)
    assert "not native" in got.reason


def test_explicit_values_win_and_skip_the_probe(monkeypatch, train_cfg):
    timed = scripted(monkeypatch, {(False, False): 1.0, (True, False): 0.1, (False, True): 0.1, (True, True): 0.1})
    cfg = train_cfg(tiny())  # tiny() fixes 32-true / contiguous
    assert numerics.resolve(cfg) is None and timed == []
    assert (cfg.trainer.precision, cfg.model.memory_format) == ("32-true", "contiguous")
    # one fixed, one auto: only the auto one is probed and changed
    cfg = train_cfg([*tiny(), "model.memory_format=auto"])
    got = numerics.resolve(cfg)
    assert cfg.trainer.precision == "32-true" and cfg.model.memory_format == "channels_last" == got.memory_format
    assert all(not bf16 for bf16, _ in timed)


def test_ddp_ranks_take_rank_zeros_choice(monkeypatch, train_cfg):
    scripted(monkeypatch, {(False, False): 1.0, (True, False): 0.4, (False, True): 1.0, (True, True): 0.9})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = train_cfg([*tiny(), *AUTO_NUMERICS])
    assert numerics.resolve(cfg).precision == "bf16-mixed"
    handed = json.loads(numerics.os.environ[numerics.ENV])
    assert handed["precision"] == "bf16-mixed"

    def no_probe(*args, **kwargs):
        raise AssertionError("a launched rank must not probe")

    monkeypatch.setattr(numerics, "time_candidates", no_probe)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = train_cfg([*tiny(), *AUTO_NUMERICS])
    got = numerics.resolve(cfg)
    assert (cfg.trainer.precision, cfg.model.memory_format) == ("bf16-mixed", "contiguous") and "rank 0" in got.reason
    monkeypatch.delenv(numerics.ENV)


def test_real_probe_on_this_machine():
    """No scripted times: the probe runs the network on this CPU and returns a valid, recorded choice."""
    got = numerics.choose(tiny_net, [32, 32, 32], torch.device("cpu"))
    assert got.precision in ("32-true", "bf16-mixed") and got.memory_format in ("contiguous", "channels_last")
    assert len(got.seconds) == (4 if numerics.bf16_fast(torch.device("cpu")) else 2)
    assert all(0 < s < 5 for s in got.seconds.values())
    assert "16x16x16" in got.reason or "24x24x24" in got.reason  # capped probe patch, a multiple of the divisor


def test_probe_patch_is_capped_and_divisible():
    assert numerics.probe_patch([32, 32, 64], 4) == [24, 24, 24]
    assert numerics.probe_patch([16, 16, 16], 4) == [16, 16, 16]
    assert numerics.probe_patch([64, 64, 64], 16) == [32, 32, 32]


def test_train_records_the_resolved_numerics(tmp_path, train_cfg):
    from mr2ct.train import train

    cfg = train_cfg([*tiny(), *AUTO_NUMERICS, "callbacks.image_logger=null"])
    train(cfg)
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert info["numerics"]["precision"] == ckpt["mr2ct_config"]["trainer"]["precision"] != "auto"
    assert info["numerics"]["memory_format"] == ckpt["mr2ct_config"]["model"]["memory_format"] != "auto"
    assert OmegaConf.select(cfg, "trainer.precision") != "auto"


HEAP_PROBE = """
import json, sys, torch
from mr2ct.numerics import fixed_mmap_threshold
from mr2ct.profiling.memory import current_rss
fixed = fixed_mmap_threshold() if sys.argv[1] == "fixed" else False
torch.empty(8 << 18).fill_(1)  # 8 MiB, freed at once: glibc's sliding threshold rises to it
before = current_rss()
block = torch.empty(7 << 18).fill_(1)  # 7 MiB: from the heap unless the threshold is fixed
del block
print(json.dumps({"fixed": fixed, "kept_mib": (current_rss() - before) / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_fixed_mmap_threshold_hands_freed_activations_back():
    got = {mode: json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True).stdout)
           for mode in ("glibc", "fixed")}
    assert got["fixed"]["fixed"] is True
    assert got["glibc"]["kept_mib"] > 6, got  # the default keeps the freed block resident in its heap
    assert got["fixed"]["kept_mib"] < 1, got
