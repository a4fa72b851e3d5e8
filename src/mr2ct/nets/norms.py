"""Normalisation choices (``norm=``) understood by every network of :mod:`mr2ct.nets`:

* ``"instance"`` -- ``InstanceNorm3d(affine=True, track_running_stats=False)``. Note: MONAI's ``"INSTANCE"`` and
  pix2pix's ``"instance"`` are ``affine=False``; we keep the learnable per-channel scale/shift (it costs 2·C
  parameters and lets a layer undo the normalisation), which is also what makes dropping the bias of the
  preceding convolution lossless. This is the default: the batch size is typically 1-2 for 3D volumes, where
  batch statistics are useless.
* ``"batch"`` -- ``BatchNorm3d`` (affine, running statistics).
* ``"none"`` -- no normalisation; the convolutions then keep their bias.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMS", "InstanceNorm3d", "norm_layer", "monai_norm", "use_fast_instance_norm"]

NORMS = ("instance", "batch", "none")


def _check_norm(norm: str) -> str:
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return key


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (no running statistics) computed by the group-norm kernel with one group per channel,
    or for channels-last input on CPU by the batch-norm kernel one sample at a time.

    Same maths, parameters and state-dict keys; PyTorch's instance norm reshapes to a (1, B*C, ...) batch norm,
    which on CPU is slower forward+backward than ``group_norm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or x.dim() != 5:
            return super().forward(x)
        if _channels_last_cpu(x):
            # the CPU group-norm kernel is many times slower on channels-last input than on contiguous, the
            # channels-last batch-norm kernel is not; one sample's batch statistics are its instance statistics
            parts = [nn.functional.batch_norm(s, None, None, self.weight, self.bias, True, 0.0, self.eps) for s in x.split(1)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def _channels_last_cpu(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
        and x.shape[2:].numel() > 1
    )


def use_fast_instance_norm(net: nn.Module) -> nn.Module:
    """Swap every plain ``nn.InstanceNorm3d`` inside ``net`` (e.g. built by MONAI) for :class:`InstanceNorm3d`."""
    for m in net.modules():
        if type(m) is nn.InstanceNorm3d:
            m.__class__ = InstanceNorm3d
    return net


def norm_layer(norm: str, channels: int) -> nn.Module | None:
    """A 3D normalisation layer for ``channels`` channels, or ``None`` for ``norm="none"``.

    Args:
        norm: ``"instance"``, ``"batch"`` or ``"none"`` (see the module docstring).
        channels: number of channels C of the (B, C, X, Y, Z) input.
    """
    key = _check_norm(norm)
    if key == "instance":
        return InstanceNorm3d(channels, affine=True, track_running_stats=False)
    if key == "batch":
        return nn.BatchNorm3d(channels)
    return None


def monai_norm(norm: str) -> tuple[str, dict] | None:
    """The same choice as :func:`norm_layer`, spelled for MONAI blocks (``Convolution(norm=...)``)."""
    key = _check_norm(norm)
    if key == "instance":
        return ("instance", {"affine": True, "track_running_stats": False})
    if key == "batch":
        return ("batch", {})
    return None
