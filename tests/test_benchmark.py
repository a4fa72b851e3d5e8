"""The speed/memory scripts run end to end on a tiny configuration and report sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT

TINY = ["generator.channels=[4,8,16,32]", "discriminator.ndf=4"]


def _script(name: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / name), *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_benchmark_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = _script("benchmark.py", ["generator=unet", "patch=16", "steps=1", "threads=1", "savers=none,split+ckpt+bf16_state+trim",
                                   "translate=32x32x16", "ceiling=16", f"out={out}", "loss=+mind", *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"conv_fb", "conv_fb_cl", "conv_fwd", "matmul"} <= report["ceilings"].keys()
    assert all(c["gflop_per_s"] > 0 for c in report["ceilings"].values())
    runs = {r["saver"]: r for r in report["runs"]}
    assert runs.keys() == {"none", "split+ckpt+bf16_state+trim"}
    assert "model.optimizer_state=bfloat16" in runs["split+ckpt+bf16_state+trim"]["overrides"]
    assert all("loss=+mind" in r["overrides"] for r in runs.values())  # a config group passes through like a.b=c
    # numerics auto, as mr2ct.train runs them: both layouts (and where bf16 is native, both precisions) tried on the
    # first steps, two rounds of two timed steps each (one, for a candidate 1.5x slower than the best), then the steps timed
    trial = runs["none"]["trial_s"]
    assert {"fp32/contiguous", "fp32/channels_last"} <= trial.keys() or {"bf16/contiguous", "bf16/channels_last"} <= trial.keys()
    assert all(len(v) in (2, 4) for v in trial.values()) and len(runs["none"]["step_times"]) == 1
    ceil = report["ceilings"]
    for r in runs.values():
        assert r["median_s"] > 0 and r["flops"] > 0
        assert r["gflop_per_s"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        # MFU against the best fwd+bwd conv ceiling of the run's own numerics, and a step never beats it
        kinds = ("conv_fb_bf16", "conv_fb_bf16_cl") if r["numerics"].startswith("bf16") else ("conv_fb", "conv_fb_cl")
        best = max(ceil[k]["gflop_per_s"] for k in kinds if k in ceil)
        assert r["mfu_conv_fb"] == pytest.approx(r["gflop_per_s"] / best) and 0 < r["mfu_conv_fb"] < 1
        assert r["mfu_matmul"] == pytest.approx(r["gflop_per_s"] / ceil["matmul"]["gflop_per_s"])
        # the README's promise for the planner's memory model: within 15 % of the measured peak
        assert r["peak_rss_gb"] > r["runtime_rss_gb"] > 0 and abs(r["rss_prediction_error"]) < 0.15
        assert r["predicted_rss_gb"] == pytest.approx(r["peak_rss_gb"] * (1 + r["rss_prediction_error"]))
    assert runs["split+ckpt+bf16_state+trim"]["flops"] > runs["none"]["flops"]  # checkpointing recomputes forwards
    (t,) = report["translations"]
    assert t["shape"] == [32, 32, 16] and t["voxels_per_s"] > 0
    assert "MFU conv" in res.stdout and "translate unet" in res.stdout
    bad = _script("benchmark.py", ["nonsense=1"])
    assert bad.returncode != 0 and "unknown key 'nonsense'" in bad.stderr
    bad = _script("benchmark.py", ["savers=none,split+nonsense"])
    assert bad.returncode != 0 and "unknown saver 'nonsense'" in bad.stderr


def test_profile_step_prints_profile_and_ablation():
    res = _script("profile_step.py", ["data.patch_size=[16,16,16]", "steps=1", "threads=1", "top=5", "ceiling=16", *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "aten::" in res.stdout and "TFLOP per step" in res.stdout
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith(("torch defaults", "+ "))]
    assert len(rows) == 5 and all(float(ln.split()[-4]) > 0 for ln in rows)
    assert rows[-1].startswith("+ narrow-input backward (as shipped)")
    chosen = _script("profile_step.py", ["data.patch_size=[16,16,16]", "steps=1", "threads=1", "top=1", "ceiling=16", "variants=5,4,5", *TINY])
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    names = [ln.split("  ")[0] for ln in chosen.stdout.splitlines() if ln.startswith(("torch defaults", "+ "))]
    assert names == ["+ narrow-input backward (as shipped)", "+ oneDNN for small inputs", "+ narrow-input backward (as shipped)"]
