"""CycleGAN ResNet generator (Zhu et al. 2017, Johnson et al. 2016) in 3D."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mr2ct.nets.cpu_conv import W_SLAB, use_fast_convs
from mr2ct.nets.norms import norm_layer

__all__ = ["ResnetGenerator3D", "ResnetBlock3D"]

PADDING_MODES = ("reflect", "replicate", "zeros")
#: upsampling of the decoders: transposed conv (the CycleGAN layout) or trilinear resize + conv (no checkerboard)
UPSAMPLE_MODES = ("transpose", "resize")


def _conv_norm_act(
    cin: int, cout: int, kernel_size: int, norm: str, *, stride: int = 1, padding: int = 0,
    padding_mode: str = "zeros", transposed: bool = False, act: bool = True, resize: bool = False,
) -> list[nn.Module]:
    """conv -> norm -> ReLU as a list of layers; the conv has a bias only when there is no norm to cancel it.

    ``transposed`` upsamples by ``stride``: a transposed conv, or with ``resize`` a trilinear resize followed by
    a stride-1 conv (a 3³ kernel does not divide by stride 2, so the transposed conv overlaps unevenly and
    prints a checkerboard; Odena et al. 2016).
    """
    n = norm_layer(norm, cout)
    if transposed and resize:
        up = nn.Upsample(scale_factor=stride, mode="trilinear", align_corners=False)
        return [up, *_conv_norm_act(cin, cout, kernel_size, norm, padding=padding, padding_mode=padding_mode, act=act)]
    if transposed:
        conv = nn.ConvTranspose3d(
            cin, cout, kernel_size, stride=stride, padding=padding, output_padding=stride - 1, bias=n is None
        )
    else:
        conv = nn.Conv3d(
            cin, cout, kernel_size, stride=stride, padding=padding, padding_mode=padding_mode, bias=n is None
        )
    layers: list[nn.Module] = [conv]
    if n is not None:
        layers.append(n)
    if act:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ResnetBlock3D(nn.Module):
    """pad-conv3³-norm-ReLU-(dropout)-pad-conv3³-norm, plus the identity skip.

    Shapes: (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """

    def __init__(self, channels: int, norm: str = "instance", padding_mode: str = "reflect", dropout: float = 0.0):
        super().__init__()
        layers = _conv_norm_act(channels, channels, 3, norm, padding=1, padding_mode=padding_mode)
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += _conv_norm_act(channels, channels, 3, norm, padding=1, padding_mode=padding_mode, act=False)
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator3D(nn.Module):
    """The CycleGAN ResNet generator in 3D.

    Layout (``ngf`` = base width; as pix2pix's ``ResnetGenerator`` with every 2D op made 3D):

    * stem: 7³ conv (padding 3, ``padding_mode``) ``C_in -> ngf``, norm, ReLU;
    * 2 downsamplings: 3³ conv stride 2 (zero padding 1) ``ngf -> 2ngf -> 4ngf``, norm, ReLU;
    * ``n_blocks`` residual blocks at 4ngf (:class:`ResnetBlock3D`, padding per ``padding_mode``);
    * 2 upsamplings: 3³ transposed conv stride 2 (padding 1, output_padding 1: sizes double exactly)
      ``4ngf -> 2ngf -> ngf``, norm, ReLU;
    * head: 7³ conv (padding 3, ``padding_mode``) ``ngf -> C_out`` with bias, ``tanh``.

    All convolutions are the CPU-routed subclasses of :mod:`mr2ct.nets.cpu_conv` (same parameters); the
    1-channel head becomes a :class:`~mr2ct.nets.cpu_conv.NarrowConv3d` (same maths, faster on CPU).

    Convs followed by a norm have no bias. With ``ngf=64`` there are 34.1 M parameters for 9 blocks and
    9.3 M for 2 blocks (the 2D original has 11.4 M for 9 blocks).

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        ngf: width of the first layer.
        n_blocks: number of residual blocks.
        norm: ``"instance"`` (affine), ``"batch"`` or ``"none"``; see :mod:`mr2ct.nets.init`.
        padding_mode: ``"reflect"`` (CycleGAN), ``"replicate"`` or ``"zeros"``, for the stem, the residual blocks
            and the head (the strided convs pad with zeros, as in CycleGAN).
        dropout: dropout probability inside each residual block (CycleGAN's ``use_dropout`` is 0.5).
        checkpointing: activation-checkpoint the stem with the first down stage, the second down stage, each
            residual block, the first up stage, and the last up stage with the head (``torch.utils.checkpoint``,
            non-reentrant; only while grad is enabled): only low-resolution tensors are kept between segments,
            never a full-resolution ``ngf``-channel one. Same outputs and gradients (RNG state is restored for
            dropout), much lower peak memory, ~1 extra forward of compute; the head then also runs in slabs along
            W under autograd (:class:`~mr2ct.nets.cpu_conv.NarrowConv3d` ``w_slab``).
            Caveat: with ``norm="batch"`` the recomputation updates the running statistics a second time.

    Shapes:
        input (B, C_in, X, Y, Z) -> output (B, C_out, X, Y, Z) in [-1, 1]. X, Y and Z must be divisible by
        :attr:`divisor` = 4 (and, for reflect padding, be at least 8); otherwise ``forward`` raises ``ValueError``.
    """

    divisor: int = 4

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "instance",
        padding_mode: str = "reflect",
        dropout: float = 0.0,
        checkpointing: bool = False,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.padding_mode = padding_mode

        stages: list[nn.Module] = [
            nn.Sequential(*_conv_norm_act(in_channels, ngf, 7, norm, padding=3, padding_mode=padding_mode))
        ]
        for mult in (1, 2):
            stages.append(nn.Sequential(*_conv_norm_act(ngf * mult, ngf * mult * 2, 3, norm, stride=2, padding=1)))
        stages += [ResnetBlock3D(ngf * 4, norm, padding_mode, dropout) for _ in range(n_blocks)]
        for mult in (4, 2):
            stages.append(
                nn.Sequential(
                    *_conv_norm_act(
                        ngf * mult, ngf * mult // 2, 3, norm, stride=2, padding=1, transposed=True, resize=upsample == "resize"
                    )
                )
            )
        stages.append(
            nn.Sequential(nn.Conv3d(ngf, out_channels, 7, padding=3, padding_mode=padding_mode), nn.Tanh())
        )
        self.model = use_fast_convs(nn.Sequential(*stages))
        self.checkpointing = checkpointing
        # checkpoint segments [start, end) of self.model: the full-resolution ends (stem, last up stage,
        # head) go with their neighbour, so a segment boundary (what checkpointing keeps) is at most 1/8 of
        # the voxels; the traced tensor peak of the peer configuration drops by 0.07 GB, same FLOPs
        n = len(stages)
        self.segments = [(0, 2), *[(i, i + 1) for i in range(2, n - 2)], (n - 2, n)]

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        self._checkpointing = bool(on)
        # with checkpointing the head's padded map and its gradients were the step's memory peak: slabs
        self.model[-1][0].w_slab = W_SLAB if on else None

    def check_input_size(self, spatial) -> None:
        """Raise ``ValueError`` unless every spatial size is a positive multiple of 4 (>= 8 unless zero padding)."""
        minimum = self.divisor if self.padding_mode == "zeros" else 2 * self.divisor
        if any(s % self.divisor or s < minimum for s in spatial):
            raise ValueError(
                f"ResnetGenerator3D: spatial size {tuple(spatial)} must be divisible by {self.divisor} and at "
                f"least {minimum} (padding_mode={self.padding_mode!r}); pad or crop the input"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z) in [-1, 1]."""
        self.check_input_size(x.shape[2:])
        if not (self.checkpointing and torch.is_grad_enabled()):
            return self.model(x)
        for start, end in self.segments:
            x = checkpoint(self._run, start, end, x, use_reentrant=False)
        return x

    def _run(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        for stage in self.model[start:end]:
            x = stage(x)
        return x
