"""3D UNet generator built from MONAI blocks, with optional activation checkpointing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torch.utils.checkpoint import checkpoint

from mr2ct.nets.cpu_conv import use_fast_convs
from mr2ct.nets.norms import monai_norm, use_fast_instance_norm

__all__ = ["UNetGenerator", "strip_bias_before_norm"]


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def strip_bias_before_norm(net: nn.Module) -> nn.Module:
    """Remove the bias of every MONAI ``Convolution`` whose conv is directly followed by Batch/InstanceNorm.

    The normalisation subtracts the per-channel mean, so such a bias has no effect on the output and only costs
    memory traffic and an optimizer slot. Convs without a following norm (``conv_only`` blocks, the residual
    projections of ``ResidualUnit``) keep theirs. Returns ``net`` (modified in place).
    """
    for m in net.modules():
        if isinstance(m, Convolution) and hasattr(m, "adn"):
            first = next(iter(m.adn.children()), None)
            if isinstance(first, _NORMS) and m.conv.bias is not None:
                m.conv.bias = None
    return net


class UNetGenerator(nn.Module):
    """3D UNet generator with a ``tanh`` output (intensities live in [-1, 1]).

    The topology is exactly that of :class:`monai.networks.nets.UNet` (same blocks, same order, same
    parameters up to the dropped biases), re-composed from MONAI ``Convolution``/``ResidualUnit`` blocks as an
    explicit encoder / bottom / decoder so that each block can be activation-checkpointed:

    * encoder level ``i``: ``channels[i-1] -> channels[i]``, strided 3³ conv (``num_res_units == 0``) or a
      strided ``ResidualUnit`` with ``num_res_units`` subunits; level 0 already downsamples (as in MONAI);
    * bottom: the same block with stride 1, ``channels[-2] -> channels[-1]``;
    * decoder level ``i`` (deepest first): the concatenation ``[encoder_i output, decoder_{i+1} output]`` goes
      through a 3³ transposed conv with stride ``strides[i]`` (followed by a one-subunit ``ResidualUnit`` when
      ``num_res_units > 0``) to ``channels[i-1]`` channels, or ``out_channels`` at the top, whose last conv has
      no norm/activation; then ``tanh``.

    Blocks are conv -> norm -> (dropout) -> PReLU (MONAI's "NDA" ordering). Convs directly followed by a
    norm layer carry no bias (the norm cancels it).

    Two configurations are shipped (``conf/generator/unet*.yaml``, the one source of their settings):

    * ``unet`` (the original generator's layout): ``channels=(16, 32, 64, 128), strides=(1, 2, 2),
      num_res_units=0`` -- one plain conv per encoder/decoder block, a full-resolution first level (divisor 4).
    * ``unet_updated``: ``channels=(32, 64, 128, 256, 320), strides=(2, 2, 2, 2), num_res_units=2`` -- every
      encoder block is a residual unit of two conv-norm-act subunits (plus a strided residual projection),
      every decoder block adds a one-subunit residual unit after the transposed conv, one more resolution
      level (divisor 16) and twice the width.

    Both use instance norm (``InstanceNorm3d(affine=True)``, see :mod:`mr2ct.nets.init`).

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        channels: channels of each level, top first; ``len(channels) == len(strides) + 1``.
        strides: downsampling factor of each level (int per level).
        num_res_units: 0 for plain conv blocks, else subunits per encoder residual unit.
        norm: ``"instance"``, ``"batch"`` or ``"none"``.
        dropout: dropout probability after each norm (0 disables it).
        upsample: ``"transpose"`` (3³ transposed convs, MONAI's layout) or ``"resize"`` (trilinear resize then a 3³
            conv: a 3³ kernel with stride 2 overlaps unevenly and prints a checkerboard, Odena et al. 2016).
        checkpointing: recompute every encoder/bottom/decoder block in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) instead of storing its activations. Same outputs and
            gradients, lower peak memory, ~1 extra forward of compute. Only active while grad is enabled.
            Caveat: with ``norm="batch"`` the recomputation updates the running statistics a second time.
        input_skip: initial value of a learnable scalar ``s`` that adds the input to the output before
            ``tanh``: ``tanh(h + s * x)``. 0 (the default) builds no such parameter. -1 starts the generator
            from the intensity-inverted input: MRI-dark structures (cortical bone, air) come out bright,
            MRI-bright ones (fat, fluid) dark (README "Translation quality"). Needs ``in_channels == out_channels``.
        top_norm: with ``num_res_units > 0``, normalise the top decoder block's up-conv output, which is only
            ``out_channels`` wide (MONAI's topology; the argument's default, so that generator configs written
            before this option rebuild unchanged). ``False`` (the shipped configs) leaves that conv un-normalised,
            with its bias, so the output keeps the level and contrast the decoder computed instead of every
            patch's own mean and scale (README "Translation quality"). No effect with ``num_res_units == 0``,
            whose top conv has no norm.

    Shapes:
        input (B, C_in, X, Y, Z) -> output (B, C_out, X, Y, Z) with values in [-1, 1]. X, Y and Z must be
        divisible by :attr:`divisor` (the product of the strides); otherwise ``forward`` raises ``ValueError``
        (pad or crop the patch instead of silently getting a differently sized output).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 0,
        norm: str = "instance",
        dropout: float = 0.0,
        checkpointing: bool = False,
        upsample: str = "transpose",
        input_skip: float = 0.0,
        top_norm: bool = True,
    ) -> None:
        super().__init__()
        if input_skip and in_channels != out_channels:
            raise ValueError(f"input_skip needs in_channels == out_channels, got {in_channels} and {out_channels}")
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"upsample must be 'transpose' or 'resize', got {upsample!r}")
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1 >= 1, got channels={channels}, strides={strides}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels, self.strides = channels, strides
        self.num_res_units = num_res_units
        self.checkpointing = checkpointing
        self.divisor: int = math.prod(strides)

        kw = dict(act="PRELU", norm=monai_norm(norm), dropout=dropout if dropout > 0 else None)
        levels = len(strides)

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            if num_res_units > 0:
                return ResidualUnit(3, cin, cout, strides=stride, kernel_size=3, subunits=num_res_units, **kw)
            return Convolution(3, cin, cout, strides=stride, kernel_size=3, **kw)

        def up_block(cin: int, cout: int, stride: int, is_top: bool) -> nn.Module:
            conv_only = is_top and num_res_units == 0
            # a norm over the out_channels-wide top block would erase each patch's output level and contrast
            ukw = dict(kw, norm=None) if is_top and not top_norm else kw
            if upsample == "resize":  # trilinear resize + conv: no checkerboard (Odena et al. 2016)
                conv = Convolution(3, cin, cout, strides=1, kernel_size=3, conv_only=conv_only, **ukw)
                up = conv if stride == 1 else nn.Sequential(nn.Upsample(scale_factor=stride, mode="trilinear"), conv)
            else:
                up = Convolution(3, cin, cout, strides=stride, kernel_size=3, is_transposed=True, conv_only=conv_only, **ukw)
            if num_res_units == 0:
                return up
            ru = ResidualUnit(3, cout, cout, strides=1, kernel_size=3, subunits=1, last_conv_only=is_top, **kw)
            return nn.Sequential(up, ru)

        self.encoder = nn.ModuleList(
            block(in_channels if i == 0 else channels[i - 1], channels[i], strides[i]) for i in range(levels)
        )
        self.bottom = block(channels[-2], channels[-1], 1)
        self.decoder = nn.ModuleList(
            up_block(
                channels[i] + (channels[-1] if i == levels - 1 else channels[i]),
                out_channels if i == 0 else channels[i - 1],
                strides[i],
                is_top=i == 0,
            )
            for i in reversed(range(levels))
        )
        # a plain attribute when off: checkpoints and exports of generators without it stay as they were
        self.input_skip = nn.Parameter(torch.tensor(float(input_skip))) if input_skip else None
        strip_bias_before_norm(self)
        use_fast_instance_norm(self)
        use_fast_convs(self)  # oneDNN everywhere, the narrow path for the output conv: see mr2ct.nets.cpu_conv

    def _run(self, fn, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @staticmethod
    def _cat_up(up: nn.Module, skip: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # concatenation inside the (checkpointed) block, so the concatenated tensor is not kept for backward
        return up(torch.cat((skip, h), dim=1))

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """Raise ``ValueError`` unless every spatial size is a positive multiple of :attr:`divisor`."""
        if any(s % self.divisor or s == 0 for s in spatial):
            raise ValueError(
                f"UNetGenerator: spatial size {tuple(spatial)} must be divisible by {self.divisor} "
                f"(product of strides {self.strides}); pad or crop the input"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z) in [-1, 1]."""
        self.check_input_size(x.shape[2:])
        skips = []
        h = x
        for enc in self.encoder:
            h = self._run(enc, h)
            skips.append(h)
        h = self._run(self.bottom, h)
        for up, skip in zip(self.decoder, reversed(skips)):
            h = self._run(partial(self._cat_up, up), skip, h)
        if self.input_skip is not None:
            h = h + self.input_skip.to(h.dtype) * x
        return torch.tanh(h)
