"""Translation quality per configuration at the same wall-clock budget and seed, on the phantom's test split.

    python scripts/quality.py                                          # the default only, 10 min
    python scripts/quality.py configs=old_default,short_mind,short budget_min=5 out=q.json
    python scripts/quality.py configs=old_default,short_mind,short budget_min=5 common="data.mri_contrast=t1"
    python scripts/quality.py configs=mine mine="loss=+mind model.lr_g=1e-4"   # a configuration of your own

Keys: ``configs`` (comma list of names: the presets in :data:`CONFIGS`, or names given as ``NAME="overrides"``),
``budget_min`` (wall-clock minutes of training per configuration, Lightning's ``trainer.max_time``; default
10, the budget of ``make train``), ``seed``, ``common`` (overrides added to every configuration), ``ckpt``
(``last`` or ``best``: the checkpoint evaluated), ``threads`` (torch threads per run; 0 = torch's default),
``out`` (JSON; default ``outputs/quality/<time>/quality.json``), ``keep`` (true: keep the run folders), ``raw``
(true: when the checkpoint holds a moving average of the weights, ``callbacks.ema``, also score the same run's
raw weights, as the row ``<name>/raw``: the average's effect without a second training run).

Each configuration trains in a fresh process (``python -m mr2ct.train``) into ``<out folder>/<name>/``, stops
at the budget (or at its schedule's end, whichever comes first), then ``python -m mr2ct.evaluate`` scores the
checkpoint on the test split: bone Dice, MAE, PSNR, SSIM, identifiability, diversity. The evaluation, the
segmentation and the test split are the project's own; this script only runs them. Prints a table.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: the ablation in the README: each lever alone, then together. Names are stable: the README table uses them, and
#: rows measured before MIND joined the default loss set (2026-12-07) name their loss set, so they still repeat.
CONFIGS: dict[str, str] = {
    # the default before this ablation: identity term, uniform patches, one patch per volume per epoch (1200 steps)
    "old_default": "loss=[adversarial,cycle,identity] data.body_patch_prob=0 data.patches_per_epoch=null",
    # single levers against it (the screening)
    "no_identity": "loss=[adversarial,cycle] data.body_patch_prob=0 data.patches_per_epoch=null",
    "body": "loss=[adversarial,cycle,identity] data.patches_per_epoch=null",
    "mind": "loss=[adversarial,cycle,identity,mind] data.body_patch_prob=0 data.patches_per_epoch=null",
    "mask_losses": "loss=[adversarial,cycle,identity] model.mask_losses=true data.patches_per_epoch=null",
    "norm_none": "loss=[adversarial,cycle,identity] data.body_patch_prob=0 generator.norm=none data.patches_per_epoch=null",
    "upsample_resize": "loss=[adversarial,cycle,identity] data.body_patch_prob=0 generator.upsample=resize data.patches_per_epoch=null",
    # the new loss set and patches on the old 1200-step schedule, with and without MIND and pairs
    "short": "loss=[adversarial,cycle] data.patches_per_epoch=null",
    "short_mind": "loss=[adversarial,cycle,mind] data.patches_per_epoch=null",
    "paired25_short": "loss=[adversarial,cycle,paired] data.paired_fraction=0.25 data.patches_per_epoch=null",
    "paired100_short": "loss=[adversarial,cycle,paired] data.paired_fraction=1.0 data.patches_per_epoch=null",
    # numerics and schedule length: the 2400-step default of the last round in fp32 and bf16, twice as long in bf16
    "fp32_2400": "loss=[adversarial,cycle] data.patches_per_epoch=24 trainer.precision=32-true model.memory_format=contiguous",
    "bf16_2400": "loss=[adversarial,cycle] data.patches_per_epoch=24 trainer.precision=bf16-mixed",
    "bf16_4800": "loss=[adversarial,cycle] data.patches_per_epoch=48 trainer.precision=bf16-mixed",
    # the default (eight starts of 160 steps, then 3200 steps; numerics auto) and options on it
    "default": "",
    "default_plain": "loss=[adversarial,cycle]",  # the default before MIND joined its loss set (2026-12-07)
    "default_mind": "loss=[adversarial,cycle,mind]",  # = the default since 2026-12-07
    "spectral": "loss=[adversarial,cycle,spectral]",  # spectral norm in D: the original project's best run
    # rows measured before the four short starts became the default: add the old default's settings to the
    # others (common="multistart.starts=1 data.patches_per_epoch=40") to repeat them
    "multistart": "loss=[adversarial,cycle] multistart.starts=3 multistart.epochs=10 data.patches_per_epoch=40",  # three starts of 400 steps
    # the default before the four short starts: one start, 40 patches per epoch (4000 steps)
    "default_4000": "loss=[adversarial,cycle] multistart.starts=1 data.patches_per_epoch=40",
    "skipneg": "loss=[adversarial,cycle] generator.input_skip=-1 multistart.starts=1 data.patches_per_epoch=40",  # inverted start, the old default's schedule
    "ct2000": "loss=[adversarial,cycle] data.ct_window=[-1024,2000]",  # CT scaled over -1024..2000 HU, not 3000: more output range between soft tissue and marrow
    "cycle5": "loss=[adversarial,cycle] loss.cycle.weight=5",  # lambda_cycle 5 instead of 10: the adversarial term weighs twice as much
    "d_full_res": "loss=[adversarial,cycle] discriminator.full_res_layer=true",  # a stride-1 layer in front of the discriminators
    "paired25": "loss=[adversarial,cycle,paired] data.paired_fraction=0.25",
    "paired100": "loss=[adversarial,cycle,paired] data.paired_fraction=1.0",
    "paired25_mind": "loss=+paired data.paired_fraction=0.25",  # semi-paired on the default loss set (with MIND)
    # semi-paired with the true CT's bone (> 200 HU) counted five times in the paired term
    "paired25_bone": "loss=[adversarial,cycle,paired] data.paired_fraction=0.25 loss.paired.bone_weight=4",
    "cpu_30min": "experiment=cpu_30min",  # budget_min=30: the preset's own budget (with MIND since 2026-12-07)
    "cpu_30min_plain": "experiment=cpu_30min loss=[adversarial,cycle]",  # the preset before MIND joined it
    "cpu_30min_fit": "experiment=cpu_30min loss=[adversarial,cycle] callbacks.schedule_budget.fit=true",  # its schedule fitted to the budget
    # the design command's generator, without and with the instance norm of its one-channel top block
    "unet_updated": "loss=[adversarial,cycle] generator=unet_updated generator.top_norm=false",
    "unet_updated_top_norm": "loss=[adversarial,cycle] generator=unet_updated generator.top_norm=true",  # MONAI's layout, the old default
}

STEPS_KEY = "global_step"


def parse(argv: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    keys = {"configs": "default", "budget_min": "10", "seed": "42", "common": "", "ckpt": "last", "threads": "2", "out": "", "keep": "true", "raw": "false"}
    custom: dict[str, str] = {}
    for arg in argv:
        if "=" not in arg:
            sys.exit(f"mr2ct: error: expected key=value, got {arg!r} (see the docstring: python scripts/quality.py --help)")
        key, value = arg.split("=", 1)
        (keys if key in keys else custom)[key] = value
    for name in keys["configs"].split(","):
        if name not in CONFIGS and name not in custom:
            sys.exit(f"mr2ct: error: unknown configuration {name!r}: one of {sorted(CONFIGS)} or give it as {name}=\"overrides\"")
    return keys, custom


def steps_done(ckpt: Path) -> int:
    """Generator steps (= batches) a checkpoint has seen: Lightning counts two optimizer steps per batch."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return int(state.get(STEPS_KEY, 0)) // 2


def run_one(name: str, overrides: list[str], keys: dict[str, str], folder: Path) -> list[dict]:
    """Train one configuration, then score its checkpoint (and, with ``raw=true``, its raw weights): table rows."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if int(keys["threads"]) > 0:
        env["OMP_NUM_THREADS"] = keys["threads"]
    budget = float(keys["budget_min"])
    hh, mm = divmod(int(round(budget * 60)), 3600)
    max_time = f"00:{hh:02d}:{mm // 60:02d}:{mm % 60:02d}"
    train = [sys.executable, "-m", "mr2ct.train", *overrides, f"seed={keys['seed']}", f"trainer.max_time={max_time}",
             f"hydra.run.dir={folder}", "callbacks.progress_bar.refresh_rate=0"]
    t0 = time.perf_counter()
    with open(folder.parent / f"{name}.train.log", "w") as log:
        proc = subprocess.run(train, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - t0) / 60
    if proc.returncode != 0:
        return [{"name": name, "overrides": overrides, "error": f"training exited {proc.returncode}, see {folder.parent / (name + '.train.log')}"}]
    ckpts = folder / "checkpoints"
    ckpt = ckpts / "last.ckpt"
    if keys["ckpt"] == "best":
        best = sorted(ckpts.glob("best-*.ckpt"))
        ckpt = best[-1] if best else ckpt
    row = score(name, overrides, ckpt, folder / "evaluate", env)
    row.update({"steps": steps_done(ckpt), "train_min": round(minutes, 2), "run": str(folder)})
    rows = [row]
    if keys["raw"] == "true" and "error" not in row:
        raw = raw_checkpoint(ckpt)
        if raw is not None:  # the same run's weights without the moving average
            rows.append({**score(f"{name}/raw", overrides, raw, folder / "evaluate_raw", env),
                         "steps": row["steps"], "train_min": row["train_min"], "run": str(folder)})
    return rows


def raw_checkpoint(ckpt: Path) -> Path | None:
    """A copy of an EMA checkpoint whose ``state_dict`` is the raw weights (``current_model_state``); None without EMA."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "current_model_state" not in state:
        return None
    state["state_dict"] = state.pop("current_model_state")
    state.pop("averaging_state", None)
    out = ckpt.with_name(ckpt.stem + "-raw.ckpt")
    torch.save(state, out)
    return out


def score(name: str, overrides: list[str], ckpt: Path, folder: Path, env: dict[str, str]) -> dict:
    """``python -m mr2ct.evaluate`` of one checkpoint on the test split, as a table row."""
    evaluate = [sys.executable, "-m", "mr2ct.evaluate", f"ckpt={ckpt}", f"hydra.run.dir={folder}"]
    log_path = folder.parent.parent / f"{name.replace('/', '_')}.evaluate.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(evaluate, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return {"name": name, "overrides": overrides, "error": f"evaluate exited {proc.returncode}, see {log_path}"}
    summary = json.loads((folder / "summary.json").read_text())
    m = summary["metrics"]
    return {
        "name": name,
        "overrides": overrides,
        "dice": m["dice"]["mean"], "dice_sd": m["dice"]["std"],
        "mae": m["mae"]["mean"], "mae_sd": m["mae"]["std"],
        "psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"],
        "identifiability": summary["collapse"]["identifiability"], "diversity": summary["collapse"]["diversity"],
        "ckpt": str(ckpt),
    }


def table(rows: list[dict]) -> str:
    head = f"{'configuration':<22} {'bone Dice':>14} {'MAE HU':>12} {'PSNR':>6} {'SSIM':>6} {'ident.':>6} {'divers.':>7} {'steps':>6} {'min':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<22} {r['error']}")
            continue
        lines.append(
            f"{r['name']:<22} {r['dice']:>7.3f} ± {r['dice_sd']:.3f} {r['mae']:>6.1f} ± {r['mae_sd']:>3.0f} {r['psnr']:>6.2f} "
            f"{r['ssim']:>6.3f} {r['identifiability']:>6.2f} {r['diversity']:>7.3f} {r['steps']:>6d} {r['train_min']:>5.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    keys, custom = parse(argv)
    out = Path(keys["out"]) if keys["out"] else ROOT / "outputs" / "quality" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = shlex.split(keys["common"])
    rows = []
    print(f"budget {keys['budget_min']} min per configuration, seed {keys['seed']}, threads {keys['threads']}; results in {out}", flush=True)
    for name in keys["configs"].split(","):
        overrides = [*shlex.split(custom.get(name, CONFIGS.get(name, ""))), *common]
        print(f"{name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        new = run_one(name, overrides, keys, out.parent / name)
        rows += new
        out.write_text(json.dumps({"budget_min": float(keys["budget_min"]), "seed": int(keys["seed"]), "common": common, "runs": rows}, indent=2))
        print("\n".join(table(new).splitlines()[2:]), flush=True)
    print()
    print(table(rows))
    print(f"written: {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
