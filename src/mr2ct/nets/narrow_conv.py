"""Convolutions with few output channels, computed the way CPU kernels are fast at.

oneDNN (PyTorch's CPU convolution backend) blocks output channels by 16: a Conv3d with 1 output channel
costs as much as one with 16. The output heads of the generators are such convolutions at full resolution
(ResNet: 7³, 64 -> 1; UNet: 3³ transposed, 32 -> 1). Measured at 2 threads on 1x64x32x64x64, the ResNet head
took 435 ms forward (13 GFLOP/s, a third of the whole generator's forward) and 1.35 s forward+backward.

:func:`narrow_conv3d` computes the same convolution as a (1, 1, k_w) convolution into ``k_d * k_h * C_out``
channels -- wide enough for the kernel -- followed by a sum of ``k_d * k_h`` shifted slices of it: 85 ms
forward and 0.39 s forward+backward for that head. :class:`NarrowConv3d` and :class:`NarrowConvTranspose3d`
are drop-in subclasses of the torch layers (same parameters, same state-dict keys) that take this path on
CPU when it applies and defer to the parent class otherwise (CUDA, strides, dilation, groups, wide outputs).

It pays only for very narrow outputs: forward+backward at 64³ with 32 input channels and a 3³ kernel, 1 output
channel took 121 ms vs 158 ms, but 4 outputs 227 vs 159 ms and 8 outputs 356 vs 163 ms (the shifted sums
are memory-bound). :func:`use_narrow_convs` therefore swaps only single-output layers by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["narrow_conv3d", "NarrowConv3d", "NarrowConvTranspose3d", "use_narrow_convs"]

#: oneDNN's output-channel block on AVX-512: narrower layers cost as much as this many channels
_BLOCK = 16


class _ShiftSum(torch.autograd.Function):
    """(B, K_d, K_h, C, D + K_d - 1, H + K_h - 1, W) -> (B, C, D, H, W): sum over (a, b) of y[:, a, b, :, a:a+D, b:b+H].

    A hand-written backward: autograd's own would build one zero tensor the size of ``y`` per slice.
    """

    @staticmethod
    def forward(ctx, y: Tensor, d: int, h: int) -> Tensor:  # noqa: ANN001
        ctx.shape, ctx.d, ctx.h = y.shape, d, h
        kd, kh = y.shape[1], y.shape[2]
        out = y[:, 0, 0, :, :d, :h].contiguous()
        for a in range(kd):
            for b in range(kh):
                if a or b:
                    out.add_(y[:, a, b, :, a : a + d, b : b + h])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        gy = grad.new_zeros(ctx.shape)
        d, h = ctx.d, ctx.h
        for a in range(ctx.shape[1]):
            for b in range(ctx.shape[2]):
                gy[:, a, b, :, a : a + d, b : b + h] = grad
        return gy, None, None


def narrow_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv3d(x, weight, bias)`` (stride 1, no padding, no dilation, one group), computed for small C_out.

    Args:
        x: (B, C_in, D', H', W') input, already padded.
        weight: (C_out, C_in, k_d, k_h, k_w).
        bias: (C_out,) or ``None``.

    Returns:
        (B, C_out, D' - k_d + 1, H' - k_h + 1, W' - k_w + 1), equal to ``F.conv3d`` up to float rounding.
    """
    c_out, c_in, kd, kh, kw = weight.shape
    # output channel (a * k_h + b) * C_out + o holds the k_w-wide partial sums of kernel row (a, b)
    w = weight.permute(2, 3, 0, 1, 4).reshape(kd * kh * c_out, c_in, 1, 1, kw)
    y = F.conv3d(x, w)
    b_, _, dp, hp, wp = y.shape
    out = _ShiftSum.apply(y.view(b_, kd, kh, c_out, dp, hp, wp), dp - kd + 1, hp - kh + 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1, 1)


def _applies(layer: nn.Module, x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 5
        and layer.out_channels < _BLOCK
        and layer.groups == 1
        and all(s == 1 for s in layer.stride)
        and all(d == 1 for d in layer.dilation)
        and not isinstance(layer.padding, str)
        and layer.kernel_size[0] * layer.kernel_size[1] > 1
    )


class NarrowConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs :func:`narrow_conv3d` on CPU when ``out_channels < 16`` (stride/dilation 1, one group)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _applies(self, x):
            return super().forward(x)
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        return narrow_conv3d(x, self.weight, self.bias)


class NarrowConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` that runs :func:`narrow_conv3d` on CPU for stride 1 and ``out_channels < 16``.

    A stride-1 transposed convolution is the convolution with the flipped, in/out-swapped kernel over the input
    zero-padded by ``k - 1 - padding``.
    """

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        pad = [k - 1 - p for k, p in zip(self.kernel_size, self.padding)]
        if output_size is not None or any(self.output_padding) or min(pad) < 0 or not _applies(self, x):
            return super().forward(x, output_size)
        weight = self.weight.flip(2, 3, 4).transpose(0, 1)
        x = F.pad(x, [p for p in reversed(pad) for _ in range(2)])
        return narrow_conv3d(x, weight, self.bias)


def use_narrow_convs(net: nn.Module, max_out: int = 1) -> nn.Module:
    """Swap every plain ``nn.Conv3d``/``nn.ConvTranspose3d`` of ``net`` with at most ``max_out`` output channels
    for its narrow subclass (in place; parameters and state-dict keys are unchanged). Returns ``net``."""
    for m in net.modules():
        if type(m) is nn.Conv3d and m.out_channels <= max_out:
            m.__class__ = NarrowConv3d
        elif type(m) is nn.ConvTranspose3d and m.out_channels <= max_out:
            m.__class__ = NarrowConvTranspose3d
    return net
