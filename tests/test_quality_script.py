"""scripts/quality.py: each configuration trains for the budget, is scored by evaluate, lands in the table and JSON."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_trains_evaluates_and_tabulates_each_configuration(tmp_path):
    out = tmp_path / "q.json"
    common = " ".join([*tiny(), "model.n_epochs=1", "model.n_epochs_decay=1"])
    cmd = [sys.executable, str(ROOT / "scripts" / "quality.py"), "configs=old_default,mine", "mine=loss=+mind callbacks.ema.enabled=true", "budget_min=0.1",
           "raw=true", "threads=1", f"common={common}", f"out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    # with the weights averaged, raw=true adds the same run's raw weights as a row; without, there are none to add
    assert [r["name"] for r in runs] == ["old_default", "mine", "mine/raw"]
    ema, raw = (torch.load(runs[i]["ckpt"], map_location="cpu", weights_only=False) for i in (1, 2))
    assert "current_model_state" in ema and "current_model_state" not in raw
    key = next(k for k in raw["state_dict"] if k.startswith("g_ab.") and k.endswith("weight"))
    assert torch.equal(raw["state_dict"][key], ema["current_model_state"][key])
    assert not torch.equal(raw["state_dict"][key], ema["state_dict"][key])
    runs = runs[:2]
    for r in runs:
        assert 0.0 <= r["dice"] <= 1.0 and r["mae"] > 0 and r["steps"] >= 1 and r["identifiability"] >= 0
        assert (Path(r["run"]) / "evaluate" / "summary.json").is_file()
    assert runs[0]["overrides"][:2] == shlex.split("loss=[adversarial,cycle,identity] data.body_patch_prob=0")
    assert "MINDLoss" in (Path(runs[1]["run"]) / ".hydra" / "config.yaml").read_text()  # the named configuration ran
    table = res.stdout.split("\n\n")[-1]
    assert "old_default" in table and "mine" in table and "bone Dice" in table
    # the tissue diagnostic reads the same checkpoint: the synthetic CT's and the real CT's mean per tissue
    import importlib.util

    spec = importlib.util.spec_from_file_location("phantom_tissues", ROOT / "scripts" / "phantom_tissues.py")
    tissues = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tissues)
    means, seg = tissues.readout(runs[0]["ckpt"], "test")
    assert {"air", "fat", "muscle", "cortical", "trabecular", "disc"} <= set(means)
    assert means["air"][1] < -900 and means["cortical"][1] > means["trabecular"][1] > means["muscle"][1]  # the real CT
    assert all(-1100 < fake < 3100 for fake, _ in means.values())
    # the real CT's body mask leaves its air out; its bone threshold lies between its muscle and its cortical shell
    assert 0.3 < seg["body_share"][1] < 0.9 and 0 < seg["body_share"][0] <= 1
    assert means["muscle"][1] < seg["threshold"][1] < means["cortical"][1]
