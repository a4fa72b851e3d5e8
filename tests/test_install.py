"""The package works as users install it: a wheel in a fresh environment, no source tree, console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_trains_and_translates_from_an_empty_folder(tmp_path):
    # built from a copy: an in-tree build leaves build/ behind, and a stale build/ would hide packaging mistakes
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    built = sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", wheels, source], tmp_path, dict(os.environ))
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("mr2ct-*.whl"))

    venv = tmp_path / "venv"
    assert sh([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, dict(os.environ)).returncode == 0
    py = venv / "bin" / "python"
    site = Path(sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, dict(os.environ)).stdout.strip())
    # the dependencies (torch, Lightning, MONAI, ...) are reused from this environment, nothing downloaded; a
    # path added by a .pth file does not run that folder's own .pth files, so the editable source install stays out
    (site / "reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = sh([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--quiet", wheel], tmp_path, dict(os.environ))
    assert installed.returncode == 0, installed.stderr[-2000:]

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = sh([py, "-c", "import mr2ct, mr2ct.config as c; print(mr2ct.__file__); print(c.CONFIG_DIR)"], work, env)
    assert where.returncode == 0 and str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr

    job = sh([venv / "bin" / "mr2ct-train", "--cfg", "job"], work, env)
    assert job.returncode == 0 and "PhantomDataModule" in job.stdout, job.stderr[-2000:]

    args = [*tiny(), "model.n_epochs=1", "model.n_epochs_decay=0", "trainer.limit_train_batches=1", "callbacks.progress_bar.refresh_rate=0"]
    trained = sh([venv / "bin" / "mr2ct-train", *args, "hydra.run.dir=run"], work, env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    mri = work / "mri.nii.gz"
    made = sh([py, "-c", f"from mr2ct.data.augment import write_phantom_nifti as w; import shutil; "
                         f"p = w('{work / 'ph'}', [1], 'mri', (24, 24, 32), (6.0, 6.0, 6.0))[0]; shutil.move(p, '{mri}')"], work, env)
    assert made.returncode == 0, made.stderr[-2000:]
    sct = work / "sct.mha"
    translated = sh([venv / "bin" / "mr2ct-translate", f"ckpt={ckpt}", f"input={mri}", f"output={sct}", "progress=false"], work, env)
    assert translated.returncode == 0 and sct.is_file(), translated.stderr[-2000:]
    assert (work / "outputs" / "translate" / "runs").is_dir()  # an installed package logs under the launch folder
