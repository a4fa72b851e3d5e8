"""Weight initialisation shared by the networks (normalisation layers: :mod:`mr2ct.nets.norms`).

``init_weights`` follows the CycleGAN/pix2pix convention (Zhu et al. 2017): convolution (and linear) weights
are drawn from N(0, gain) (``"normal"``) or initialised with Xavier/Kaiming/orthogonal, their biases are zeroed,
and the affine weights of normalisation layers are drawn from N(1, gain) with zero bias.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["init_weights", "init_output_level", "output_conv"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise ``net`` in place (CycleGAN convention) and return it.

    Args:
        net: any module; every ``Conv*d``/``ConvTranspose*d``/``Linear`` and every affine normalisation layer
            inside it is re-initialised. Other parameters (e.g. PReLU slopes) are left alone.
        init_type: ``"normal"`` (weights ~ N(0, gain)), ``"xavier"`` (Xavier-normal with ``gain``, as CycleGAN),
            ``"kaiming"`` (Kaiming-normal, fan-in, ``gain`` unused) or ``"orthogonal"`` (with ``gain``).
        gain: std of the normal init / gain of the Xavier and orthogonal inits; also the std of the N(1, gain)
            draw of normalisation weights.

    Spectrally normalised convolutions (``torch.nn.utils.parametrizations.spectral_norm``) are handled: the
    unnormalised weight ``conv.parametrizations.weight.original`` is initialised, and the power-iteration
    vectors are re-estimated for it so that the effective weight has spectral norm ≈ 1 straight away.
    """
    if init_type not in ("normal", "xavier", "kaiming", "orthogonal"):
        raise ValueError(f"init_type must be normal, xavier, kaiming or orthogonal, got {init_type!r}")
    for m in net.modules():
        if isinstance(m, _WEIGHT_TYPES):
            parametrized = hasattr(m, "parametrizations") and "weight" in m.parametrizations
            w = m.parametrizations.weight.original if parametrized else m.weight
            if init_type == "normal":
                nn.init.normal_(w, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(w, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(w, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(w, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if parametrized:
                _resync_spectral_norm(m)
        elif isinstance(m, _NORM_TYPES):
            if getattr(m, "weight", None) is not None:
                nn.init.normal_(m.weight, 1.0, gain)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return net


def _resync_spectral_norm(m: nn.Module, n_iter: int = 15) -> None:
    """Re-run the power iteration of a spectral-norm parametrisation after its weight was replaced."""
    for p in m.parametrizations.weight:
        if hasattr(p, "_u") and hasattr(p, "_power_method"):
            p._power_method(p._reshape_weight_to_matrix(m.parametrizations.weight.original), n_iter)


def output_conv(net: nn.Module) -> nn.Module:
    """The output convolution of a generator: the last convolution registered in ``net``, with a bias."""
    convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    head = convs[-1] if convs else None
    if head is None or head.bias is None or head.out_channels != getattr(net, "out_channels", head.out_channels):
        raise ValueError(f"{type(net).__name__}: no output convolution with a bias to set")
    return head


@torch.no_grad()
def init_output_level(net: nn.Module, level: float, example: torch.Tensor) -> float:
    """Shift the bias of ``net``'s output convolution so that its output on ``example`` averages ``level``.

    The generators end in ``tanh``; the shift is measured before it (``atanh`` of the output), where the
    output convolution's bias adds directly, also when a residual path is added after that convolution (a
    norm after it would cancel the shift; no generator has one there). Returns the mean of the new bias.
    """
    head = output_conv(net)
    clamp = lambda t: t.clamp(-0.99, 0.99)  # noqa: E731
    out = net(example.to(head.bias.device, head.bias.dtype)).float()
    shift = torch.atanh(clamp(torch.tensor(float(level)))) - torch.atanh(clamp(out)).mean()
    head.bias.add_(shift.to(head.bias.dtype))
    return float(head.bias.mean())
