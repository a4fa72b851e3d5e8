"""Several seeds started, the best by validation continued: mr2ct/training/multistart.py through the real training entry point."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mr2ct import train as train_module
from mr2ct.errors import ConfigError
from mr2ct.training import multistart
from mr2ct.training.multistart import Start

from conftest import tiny


def _steps(folder) -> list[int]:
    ea = EventAccumulator(str(folder / "tensorboard"))
    ea.Reload()
    return [e.step for e in ea.Scalars("train/loss_g")]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_best_start_is_continued_within_the_budget(train_cfg, tmp_path, monkeypatch, mode):
    # schedule of 3 epochs x 2 volumes; two starts of 1 epoch each, then the chosen one resumes for epochs 2-3
    cfg = train_cfg([*tiny(), "model.n_epochs=3", "multistart.starts=2", "multistart.epochs=1", "multistart.monitor=val/mae",
                     f"multistart.mode={mode}", "trainer.max_time=00:01:00:00"])
    budgets = []
    build = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer", lambda c, m, t=None, e=None: budgets.append(t) or build(c, m, t, e))
    train_module.train(cfg)

    run = tmp_path / "run"
    summary = json.loads((run / "starts" / "summary.json").read_text())
    scores = {s["seed"]: s["score"] for s in summary["starts"]}
    assert sorted(scores) == [42, 43] and all(math.isfinite(v) for v in scores.values())
    assert scores[42] != scores[43]  # different seeds, different starts
    want = (max if mode == "max" else min)(scores, key=scores.get)
    assert summary["chosen_seed"] == want
    assert json.loads((run / "run_info.json").read_text())["multistart"]["chosen_seed"] == want
    for seed in (42, 43):  # each start ran its one epoch (2 batches) on its own
        # one checkpoint per start: its single validation makes a best checkpoint a copy of the last
        assert [p.name for p in (run / "starts" / f"seed{seed}" / "checkpoints").iterdir()] == ["last.ckpt"]
        assert max(_steps(run / "starts" / f"seed{seed}")) < 4

    # the run itself resumed the chosen start: no step before the starts' epoch, and it finished the schedule
    assert min(_steps(run)) >= 2
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 3 * 2 * 2
    # the budget covers the starts: each start had what was left, the run what the other start did not use
    starts_budget, run_budget = budgets[:2], budgets[2]
    assert all(b is not None and b.total_seconds() <= 3600 for b in starts_budget)
    other = [s["seconds"] for s in summary["starts"] if s["seed"] != want][0]
    assert 3600 - other - 5 <= run_budget.total_seconds() <= 3600 - other + 1e-3


def test_best_start_skips_missing_scores_and_prefers_the_earlier_seed():
    starts = [Start(1, "a", float("nan"), 1.0), Start(2, "b", 0.5, 1.0), Start(3, "c", 0.5, 1.0), Start(4, "d", None, 1.0)]
    assert multistart.best(starts, "max").seed == 2
    assert multistart.best(starts, "min").seed == 2
    assert multistart.best([*starts, Start(5, "e", 0.1, 1.0)], "min").seed == 5
    with pytest.raises(ConfigError, match="validation"):
        multistart.best([Start(1, "a", None, 1.0)], "max")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["multistart.epochs=1"], "fewer than the schedule"),  # the tiny schedule is 1 epoch: nothing left to continue
        (["model.n_epochs=3", "multistart.epochs=1", "multistart.mode=best"], "mode"),
        (["model.n_epochs=3", "multistart.epochs=1", "trainer.devices=2"], "trainer.devices=1"),
        (["model.n_epochs=3", "multistart.epochs=1", "seed=null"], "needs a seed"),
    ],
)
def test_bad_multistart_settings_are_refused(train_cfg, overrides, message):
    cfg = train_cfg([*tiny(), "multistart.starts=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        multistart.settings(cfg)


def test_the_default_runs_several_starts(train_cfg):
    """``starts=auto`` is the default: the default run (phantom, one device, a seed) gets its starts."""
    ms = multistart.settings(train_cfg([]))
    assert ms is not None and ms["starts"] == multistart.AUTO_STARTS > 1 and ms["monitor"] == "val/ssim" and ms["mode"] == "max"


@pytest.mark.parametrize(
    "overrides, has_validation, reason",
    [
        (["trainer.devices=2"], True, "several devices"),
        (["seed=null"], True, "no seed"),
        ([], False, "no validation volumes"),
        (["multistart.epochs=3"], True, "no room"),  # the 3-epoch schedule: nothing left after a start
        (["ckpt=last"], True, None),  # a resume continues its own run
    ],
)
def test_auto_falls_back_to_one_start_where_starts_cannot_run(train_cfg, caplog, overrides, has_validation, reason):
    base = [*tiny(), "model.n_epochs=3", "multistart.epochs=1", "multistart.starts=auto"]
    assert multistart.settings(train_cfg(base))["starts"] == multistart.AUTO_STARTS
    with caplog.at_level("INFO", logger="mr2ct.multistart"):
        assert multistart.settings(train_cfg([*base, *overrides]), has_validation=has_validation) is None
    if reason:
        assert reason in caplog.text


def test_starts_must_be_auto_or_a_number(train_cfg):
    with pytest.raises(ConfigError, match="auto or a whole number"):
        multistart.settings(train_cfg([*tiny(), "multistart.starts=many"]))


def test_max_time_forms():
    assert multistart.max_time_seconds(None) is None
    assert multistart.max_time_seconds("00:01:02:03") == 3723
    assert multistart.max_time_seconds({"minutes": 2}) == 120


def test_without_validation_volumes_it_stops_before_training(train_cfg, tmp_path):
    cfg = train_cfg([*tiny(), "model.n_epochs=3", "multistart.starts=2", "multistart.epochs=1", "data.n_val=0"])
    with pytest.raises(ConfigError, match="validation volumes"):
        train_module.train(cfg)
    assert not (tmp_path / "run" / "starts").exists()
