"""Shareable weights: safetensors export, translate from it, and refusal of files that would run code."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny
from mr2ct.checkpoints import build_generator, export, safe_torch_load
from mr2ct.checkpoints import load_generator
from mr2ct.errors import InputError
from mr2ct.train import train
from test_bad_input import Evil, nifti, run_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import compose_train_cfg
    from hydra.core.global_hydra import GlobalHydra

    run = tmp_path_factory.mktemp("exp") / "run"
    # preprocessing away from the defaults, so that an export that lost it translates differently
    train(compose_train_cfg([*tiny(), "trainer.limit_train_batches=1", "data.mri_percentiles=[5.0,95.0]", "data.ct_window=[-1000,2000]"], run))
    GlobalHydra.instance().clear()
    return run / "checkpoints" / "last.ckpt"


def test_export_round_trip_matches_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    code, err = run_main("export", [f"ckpt={trained}", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "mr2ct-generators" and meta["generator"]["_target_"] == "mr2ct.nets.UNetGenerator"
    assert "train_a" not in meta["data"] and meta["data"]["patch_size"] == [16, 16, 16]
    assert all(k.startswith(("g_ab.", "g_ba.")) for k in load_file(str(out)))
    x = torch.randn(1, 1, 16, 16, 16)
    for direction in ("a2b", "b2a"):
        from_ckpt, _ = load_generator(trained, direction)
        from_st, cfg = load_generator(out, direction)
        with torch.no_grad():
            assert torch.equal(from_ckpt(x), from_st(x))
    assert cfg["model"]["inference"]["roi_size"] == [16, 16, 16]
    card = out.with_suffix(".md").read_text()
    assert "not for diagnosis" in card and "UNetGenerator" in card and "procedural spine phantoms" in card
    assert "Not evaluated" in card  # no evaluate/summary.json in the run folder
    # a second export refuses to overwrite
    code, err = run_main("export", [f"ckpt={trained}", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "output exists" in err


def test_model_card_quotes_the_evaluation(trained, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"split": "test", "n_cases": 4, "metrics": {"dice": {"mean": 0.61, "std": 0.05}, "mae": {"mean": 118.0, "std": 9.0}}}))
    out = tmp_path / "m.safetensors"
    code, err = run_main("export", [f"ckpt={trained}", f"output={out}", f"evaluation={summary}", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    card = out.with_suffix(".md").read_text()
    assert "4 test cases" in card and "dice: 0.61 ± 0.05" in card and "mae: 118 ± 9" in card


def test_translate_accepts_exported_model(trained, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    export(trained, out)
    mri = nifti(tmp_path / "mri.nii.gz", np.random.default_rng(0).random((24, 24, 32)) * 300)
    code, err = run_main("translate", [f"ckpt={out}", f"input={mri}", f"output={tmp_path / 'sct.nii.gz'}", "progress=false",
                                       f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    code, err = run_main("translate", [f"ckpt={trained}", f"input={mri}", f"output={tmp_path / 'from_ckpt.nii.gz'}", "progress=false",
                                       f"hydra.run.dir={tmp_path / 'run2'}"], capsys)
    assert code == 0, err
    # the exported weights and the config stored beside them translate exactly as the checkpoint does
    exported, direct = (nib.load(tmp_path / name) for name in ("sct.nii.gz", "from_ckpt.nii.gz"))
    assert np.array_equal(exported.affine, direct.affine)
    a, b = np.asarray(exported.dataobj, dtype=np.float32), np.asarray(direct.dataobj, dtype=np.float32)
    assert a.shape == (24, 24, 32) and a.std() > 0 and np.abs(a - b).max() < 1.0


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil(tmp_path / "PWNED")}, evil)
    with pytest.raises(InputError, match="refusing to load checkpoint .*could run code"):
        safe_torch_load(evil)
    with pytest.raises(InputError, match="refusing"):
        load_generator(evil)
    assert not (tmp_path / "PWNED").exists()


def test_config_in_a_file_cannot_name_arbitrary_callables(trained, tmp_path):
    """weights_only stops pickles; a config's _target_ is the other way a file could run code."""
    with pytest.raises(InputError, match="refusing generator _target_ 'os.system'"):
        build_generator({"_target_": "os.system", "command": "touch PWNED"}, "x")
    with pytest.raises(InputError, match="refusing"):
        build_generator({"_target_": "mr2ct.nets.UNetGenerator", "norm": {"_target_": "os.system"}}, "x")
    # the same through an exported file whose metadata was tampered with
    out = tmp_path / "model.safetensors"
    export(trained, out)
    weights = load_file(str(out))
    meta = json.loads(out.with_suffix(".json").read_text())
    meta["generator"] = {"_target_": "subprocess.call", "args": ["touch", str(tmp_path / "PWNED")]}
    save_file(weights, str(out), metadata={"mr2ct": json.dumps(meta)})
    with pytest.raises(InputError, match="refusing generator _target_"):
        load_generator(out)
    assert not (tmp_path / "PWNED").exists()


def test_exported_file_of_another_architecture_is_refused(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    export(trained, out)
    weights = {k: v for k, v in load_file(str(out)).items() if not k.endswith("bias")}
    save_file(weights, str(out), metadata={"mr2ct": out.with_suffix(".json").read_text()})
    with pytest.raises(InputError, match="belongs to another generator architecture"):
        load_generator(out)
    out.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="corrupt or not safetensors"):
        load_generator(out)


def test_generator_configs_written_before_top_norm_rebuild_their_layout():
    """Files from before ``top_norm`` existed carry no such key: they rebuild MONAI's normed top block, so their
    weights still load; the shipped config (without that norm) would not take them."""
    from omegaconf import OmegaConf

    from mr2ct.config import CONFIG_DIR
    from mr2ct.nets import UNetGenerator

    shipped = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/generator/unet_updated.yaml"))
    shipped.update(channels=[4, 8, 8], strides=[2, 2])
    old = {k: v for k, v in shipped.items() if k != "top_norm"}
    state = UNetGenerator(**{k: v for k, v in old.items() if not k.startswith("_")}).state_dict()
    build_generator(old, "old.json").load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        build_generator(shipped, "new.json").load_state_dict(state)
