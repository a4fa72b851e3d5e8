"""Generators from training checkpoints and exported files (volume files: :mod:`mr2ct.formats`).

Checkpoint loading lives in one function, :func:`load_generator`, so how checkpoints are trusted and
read is decided in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mr2ct.export import build_generator, check_state_dict_compatible, load_exported, safe_torch_load

def load_generator(ckpt_path: str | Path, direction: str = "a2b", map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild one generator of a training checkpoint: (generator in eval mode, the run's config dict).

    The checkpoint holds the resolved training config under ``mr2ct_config`` (written by
    ``CycleGAN.on_save_checkpoint``); its ``generator`` entry is instantiated and the ``g_ab``
    (``direction="a2b"``, MRI->CT) or ``g_ba`` weights loaded. Read with ``weights_only=True``: a
    checkpoint cannot run code when it is loaded.
    """
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
    path = Path(ckpt_path)
    if path.name.endswith(".safetensors"):  # exported by `python -m mr2ct.export`: no pickle at all
        return load_exported(path, direction, map_location)
    if path.suffix in (".onnx", ".pt"):  # deployable exports: ONNX Runtime or TorchScript, no mr2ct network code
        from mr2ct.deploy import load_deployed

        return load_deployed(path, direction)
    ckpt = safe_torch_load(path, map_location)  # missing, corrupt or code-carrying files: one clear error
    run_config = ckpt.get("mr2ct_config") if isinstance(ckpt, dict) else None
    if not run_config or "generator" not in run_config:
        raise ValueError(f"{path} holds no mr2ct_config: not a checkpoint written by `python -m mr2ct.train`")
    generator = build_generator(run_config["generator"], path)  # only mr2ct.nets classes, never any _target_
    prefix = "g_ab." if direction == "a2b" else "g_ba."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no {prefix[:-1]} weights")
    check_state_dict_compatible(generator.state_dict(), state, str(path), "generator")
    generator.load_state_dict(state)
    return generator.eval(), run_config
