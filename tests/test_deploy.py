"""ONNX and TorchScript exports compute what PyTorch computes, at other sizes too, and translate runs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_train_cfg, tiny
from mr2ct.checkpoints import export
from mr2ct.checkpoints import load_generator


def checkpoint(tmp_path, generator: str):
    """A checkpoint as training writes it, for ``generator`` at test size (untrained weights)."""
    cfg = compose_train_cfg([f"generator={generator}", *tiny(generator)], tmp_path / "run")
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="partial")
    run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "mr2ct_config": run_config, "epoch": 0, "global_step": 0}, path)
    GlobalHydra.instance().clear()
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("generator", ["unet", "unet_updated", "resnet3d_2blk", "resnet3d_9blk"])
def test_export_equals_pytorch_within_1e4_at_another_size(tmp_path, generator, fmt):
    ckpt = checkpoint(tmp_path, generator)
    out = tmp_path / ("g.onnx" if fmt == "onnx" else "g.pt")
    export(ckpt, out, fmt=fmt)
    deployed, config = load_generator(out)
    reference, _ = load_generator(ckpt)
    assert config["direction"] == "a2b" and config["generator"]["_target_"].startswith("mr2ct.nets.")
    x = torch.randn(1, 1, 32, 16, 48)  # not the training patch (16³): the spatial axes are dynamic
    with torch.no_grad():
        np.testing.assert_allclose(deployed(x).numpy(), reference(x).numpy(), atol=1e-4, rtol=0)
    assert (tmp_path / "g.md").is_file() and (tmp_path / "g.json").is_file()


def test_translate_runs_an_onnx_model_like_the_checkpoint(tmp_path):
    from mr2ct.data.phantom import make_phantom
    from mr2ct.inference import Preprocessing, translate_array

    ckpt = checkpoint(tmp_path, "unet")
    export(ckpt, tmp_path / "m.onnx", fmt="onnx")
    mri = make_phantom((24, 20, 28), (6.0, 6.0, 6.0), seed=5).mri
    outs = []
    for source in (ckpt, tmp_path / "m.onnx"):
        gen, run_config = load_generator(source)
        outs.append(translate_array(gen, mri, np.diag([6.0, 6.0, 6.0, 1.0]), Preprocessing.from_run_config(run_config), [16, 16, 16]))
    np.testing.assert_allclose(outs[1], outs[0], atol=0.5)  # HU
    with pytest.raises(ValueError, match="holds the a2b generator"):
        load_generator(tmp_path / "m.onnx", "b2a")
