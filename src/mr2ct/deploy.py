"""Deployable generators: one direction of a trained model as ONNX or TorchScript, and loading them back.

The file carries the same config as a safetensors export (generator settings, preprocessing, inference
window, direction) -- in the ONNX model's ``metadata_props["mr2ct"]`` or the TorchScript archive's extra
file ``mr2ct.json`` -- so ``translate ckpt=model.onnx`` needs no training checkpoint and no mr2ct network
code: the sliding-window translation calls :class:`OnnxGenerator` like any generator.

ONNX: exported with ``torch.onnx.export(dynamo=True)``, opset 18 (3D convolution, transposed convolution,
instance normalisation and reflect/replicate padding of 5-D tensors are all in it), the three spatial
axes dynamic. TorchScript: ``torch.jit.trace`` on a patch of the training size; convolutional networks
have no shape-dependent Python branches after their input check, so the trace runs at other sizes too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mr2ct.errors import InputError

__all__ = ["DEPLOY_FORMATS", "OnnxGenerator", "export_onnx", "export_torchscript", "load_deployed"]

#: format name -> file suffix
DEPLOY_FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_OPSET = 18
META_KEY = "mr2ct"


def _example(patch: Sequence[int]) -> Tensor:
    return torch.randn(1, 1, *[int(p) for p in patch])


def export_onnx(generator: nn.Module, config: Mapping[str, Any], path: Path, patch: Sequence[int]) -> Path:
    """``generator`` (B, 1, X, Y, Z) -> same shape, as ONNX with dynamic batch and spatial axes."""
    import onnx

    x = _example(patch)
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    for axis, name in zip((2, 3, 4), "XYZ"):
        dims[axis] = torch.export.Dim(name, min=4, max=4096)
    generator = generator.eval()
    program = torch.onnx.export(generator, (x,), dynamo=True, dynamic_shapes=({**dims},), opset_version=ONNX_OPSET, verbose=False)
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(dict(config))
    onnx.save(model, str(path))
    return path


def export_torchscript(generator: nn.Module, config: Mapping[str, Any], path: Path, patch: Sequence[int]) -> Path:
    """``generator`` traced on a patch, the config as the archive's extra file ``mr2ct.json``."""
    with torch.no_grad():
        traced = torch.jit.trace(generator.eval(), _example(patch), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={f"{META_KEY}.json": json.dumps(dict(config))})
    return path


class OnnxGenerator(nn.Module):
    """An exported ONNX generator run by ONNX Runtime behind the ``nn.Module`` call the inferers use.

    Shapes: (B, 1, X, Y, Z) float32 -> the same; runs on the CPU (ONNX Runtime's CPU provider) whatever
    device the input is on, and returns the output on the input's device.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


def load_deployed(path: str | Path, direction: str = "a2b") -> tuple[nn.Module, dict[str, Any]]:
    """(generator, config) from an ``.onnx`` or TorchScript ``.pt`` export; refuses the other direction."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        if path.suffix == ".onnx":
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            text, generator = meta.get(META_KEY), OnnxGenerator(path)
        else:
            extra = {f"{META_KEY}.json": ""}
            generator = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            text = extra[f"{META_KEY}.json"] or None
    except (OSError, RuntimeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"model file {path} is corrupt or not an {path.suffix[1:]} export ({reason})") from None
    try:
        config = json.loads(text) if text else None
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict) or "generator" not in config:
        raise InputError(f"{path} carries no mr2ct config (export it with `mr2ct-export format=onnx|torchscript`)")
    if config.get("direction", "a2b") != direction:
        raise InputError(f"{path} holds the {config.get('direction')} generator; export direction={direction} for this translation")
    return generator.eval(), config
