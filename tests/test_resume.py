"""Runs that survive a kill: SIGKILL/SIGTERM mid-epoch, resume in the same run folder, extended schedules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli, tiny
from mr2ct.checkpoints import atomic_torch_save, safe_torch_load
from mr2ct.errors import InputError
from mr2ct.config import PROJECT_ROOT
from mr2ct.train import train
from mr2ct.training.resume import resume_argv

N_TRAIN = 10  # batches per epoch (batch size 1)
EPOCHS = 2
# checkpoints every 2 optimizer steps (= every batch) make a kill land next to (or inside) a save
RUN = [
    *tiny(),
    f"data.n_train={N_TRAIN}",
    "model.n_epochs=1",
    f"model.n_epochs_decay={EPOCHS - 1}",
    "callbacks.last_checkpoint.every_n_batches=1",  # the kill-safe last.ckpt (mr2ct.training.checkpointing.LastCheckpoint)
    "data.augment.rotation_prob=0",
]
EXPECTED_STEPS = N_TRAIN * EPOCHS * 2  # two optimizer steps per batch
LONG_N_TRAIN = 200


def start(run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mr2ct.train", *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_step(proc: subprocess.Popen, ckpt: Path, min_step: int, timeout: float = 120) -> None:
    """Block until ``ckpt`` exists with global_step >= min_step (the training is then mid-epoch)."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        if ckpt.is_file():
            try:
                if safe_torch_load(ckpt)["global_step"] >= min_step:
                    return
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint with step >= {min_step}")


def assert_all_checkpoints_readable(run_dir: Path) -> None:
    files = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert files
    for f in files:
        ckpt = safe_torch_load(f)  # raises on a truncated file
        assert "state_dict" in ckpt and "optimizer_states" in ckpt


def final_step(run_dir: Path) -> int:
    return int(safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["global_step"])


def test_sigkill_mid_epoch_then_resume_completes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(proc, run_dir / "checkpoints" / "last.ckpt", min_step=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_all_checkpoints_readable(run_dir)
    killed_at = final_step(run_dir)
    assert 6 <= killed_at < EXPECTED_STEPS

    # ckpt=<run dir> resumes <run dir>/checkpoints/last.ckpt and writes into that same folder
    res = run_cli(["mr2ct.train", *RUN, f"ckpt={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"run folder:   {run_dir}" in res.stdout
    assert_all_checkpoints_readable(run_dir)
    ckpt = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == EXPECTED_STEPS
    assert "rng_states" in ckpt and "image_pools" in ckpt
    # one TensorBoard log, continued: the resumed steps follow the killed ones
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    steps = sorted({e.step for e in acc.Scalars("train/loss_g")})
    assert steps[-1] >= N_TRAIN * EPOCHS - 2
    assert (run_dir / "run_info.json").is_file() and list(run_dir.glob("run_info.resume*.json"))
    assert list((run_dir / ".hydra").glob("resume-*/config.yaml"))  # the original .hydra/config.yaml is kept


def test_sigterm_saves_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "run"
    # an epoch far longer than signal delivery takes, so the signal lands mid-epoch however fast the machine
    long_epoch = [f"data.n_train={LONG_N_TRAIN}"]
    proc = start(run_dir, long_epoch)
    wait_for_step(proc, run_dir / "checkpoints" / "last.ckpt", min_step=4)  # training is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM received: checkpoint saved" in out and "resume with" in out
    stopped_at = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 4 <= stopped_at < LONG_N_TRAIN * EPOCHS * 2 and stopped_at % 2 == 0  # a whole batch, not half

    # resume for two more batches: it continues from the saved step, in the same folder
    res = run_cli(["mr2ct.train", *RUN, *long_epoch, f"trainer.max_steps={stopped_at + 4}", f"ckpt={run_dir}/checkpoints/last.ckpt"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert final_step(run_dir) == stopped_at + 4


def test_ctrl_c_once_saves_and_exits_143_twice_aborts_without_saving(tmp_path):
    import threading

    once = tmp_path / "once"
    proc = start(once, [f"data.n_train={LONG_N_TRAIN}"])
    wait_for_step(proc, once / "checkpoints" / "last.ckpt", min_step=4)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "Ctrl-C: stopping after this batch" in out and "SIGINT received: checkpoint saved" in out

    # batches of seconds (48³ patches, the default UNet width), so the second Ctrl-C lands inside the batch
    # the first one let finish
    twice = tmp_path / "twice"
    slow = [f"data.n_train={LONG_N_TRAIN}", "data.shape=[48,48,64]", "data.patch_size=[48,48,48]",
            "generator.channels=[16,32,64,128]", "generator.strides=[1,2,2]"]
    proc = start(twice, slow)
    last = twice / "checkpoints" / "last.ckpt"
    wait_for_step(proc, last, min_step=2)  # one batch done, the next one just begun
    seen = final_step(twice)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)
    end = time.time() + 60
    while not any("Ctrl-C: stopping" in ln for ln in lines) and time.time() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    out = "".join(lines)
    assert "Ctrl-C: stopping" in out, out[-3000:]
    assert proc.returncode not in (0, 143), out[-3000:]
    assert "checkpoint saved" not in out and final_step(twice) == seen, out[-3000:]


def test_extending_a_finished_run_recomputes_the_schedule(train_cfg, tmp_path):
    base = [*tiny(), "trainer.limit_train_batches=1"]
    train(train_cfg([*base, "model.n_epochs=1", "model.n_epochs_decay=0"]))  # finished: 1 epoch
    metrics = train(train_cfg([*base, "model.n_epochs=1", "model.n_epochs_decay=2", "ckpt=last", "logger=csv"]))
    ckpt = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 3 * 2
    # epochs 1 and 2 of the new 1 + 2 schedule run at 2/3 and 1/3 of the base LR: the first resumed epoch jumps
    # back up from the finished run's last factor (README "Extending a finished run")
    assert metrics["lr/g"] == pytest.approx(2e-4 / 3)
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if r.get("lr/g")]
    by_epoch = {int(r["epoch"]): float(r["lr/g"]) for r in rows}
    assert by_epoch == pytest.approx({1: 2e-4 * 2 / 3, 2: 2e-4 / 3})
    assert ckpt["optimizer_states"][0]["state"], "Adam moments were saved"


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_a_full_disk_is_reported_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch reports a full disk as "unexpected pos"; the user gets what happened and what is still there."""
    import shutil
    from collections import namedtuple

    path = tmp_path / "x.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)

    def full_disk_save(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 313998144 vs 313998036")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**40, 2**20))
    with pytest.raises(InputError, match=r"x.ckpt: the disk is full \(1 MiB free after writing 0 MiB.*previous file is unchanged.*resume"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 0, 2**40))  # room left: some other failure
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_resume_argv_points_hydra_at_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    out = resume_argv(["train.py", "a=1", f"ckpt={run}"])
    assert f"ckpt={run.resolve() / 'checkpoints' / 'last.ckpt'}" in out and f"hydra.run.dir={run.resolve()}" in out
    out = resume_argv(["train.py", f"ckpt={run}/checkpoints/last.ckpt"])
    assert f"hydra.run.dir={run.resolve()}" in out
    assert resume_argv(["train.py", "ckpt=last"]) == ["train.py", "ckpt=last"]
    assert resume_argv(["train.py", f"ckpt={run}", "hydra.run.dir=/x"]) == ["train.py", f"ckpt={run}", "hydra.run.dir=/x"]
