"""3D PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, Isola et al. 2017) with optional spectral norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from mr2ct.nets.norms import norm_layer

__all__ = ["PatchDiscriminator3D"]


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: a fully convolutional classifier giving one real/fake logit per overlapping patch.

    Layout (all convs 4³ with padding 1, as pix2pix):

    * with ``full_res_layer``: first a 3³ conv stride 1 ``C_in -> ndf`` (no norm), LeakyReLU(0.2), so that the
      first features are computed at full resolution (a one-voxel cortical shell is seen as such, not only
      through a stride-2 filter), and the next conv takes ``ndf`` channels;
    * conv stride 2 ``C_in -> ndf`` (no norm), LeakyReLU(0.2);
    * ``n_layers - 1`` blocks: conv stride 2, channels doubling (capped at 8·ndf), norm, LeakyReLU(0.2);
    * conv stride 1 to ``min(2**n_layers, 8)·ndf``, norm, LeakyReLU(0.2);
    * conv stride 1 to 1 channel (with bias): the logits map (no sigmoid; use a BCE-with-logits or LSGAN loss).

    With ``n_layers=3`` each output voxel sees a 70³ receptive field (the "70×70" PatchGAN). Convs followed by a
    norm have no bias.

    Args:
        in_channels: input channels C_in.
        ndf: width of the first layer.
        n_layers: number of stride-2 convs.
        norm: ``"instance"`` (affine), ``"batch"`` or ``"none"``; see :mod:`mr2ct.nets.init`.
        spectral_norm: wrap every ``Conv3d`` with ``torch.nn.utils.parametrizations.spectral_norm``
            (Miyato et al. 2018; one power iteration per training forward). The configured ``norm`` layers are
            kept as they are (pass ``norm="none"`` for the pure SN-GAN discriminator, whose convs then regain
            their bias).
        full_res_layer: add the stride-1 3³ layer in front (shapes unchanged; more compute per step).

    Shapes:
        input (B, C_in, X, Y, Z) -> logits (B, 1, X', Y', Z') with, per dimension,
        ``n' = n // 2**n_layers - 2`` (see :meth:`output_size`). Every dimension must be at least
        :attr:`min_input_size` = ``3 * 2**n_layers`` (24 for ``n_layers=3``: a 32³ input gives 2³ logits),
        otherwise ``forward`` raises ``ValueError``. Non-cubic inputs are fine.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        spectral_norm: bool = False,
        full_res_layer: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.in_channels = in_channels
        self.n_layers = n_layers
        self.spectral_norm = spectral_norm
        self.min_input_size: int = 3 * 2**n_layers

        def conv(cin: int, cout: int, stride: int, bias: bool, kernel: int = 4) -> nn.Module:
            c = nn.Conv3d(cin, cout, kernel, stride=stride, padding=1, bias=bias)
            return _spectral_norm(c) if spectral_norm else c

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            n = norm_layer(norm, cout)
            layers = [conv(cin, cout, stride, bias=n is None)]
            if n is not None:
                layers.append(n)
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        layers: list[nn.Module] = []
        if full_res_layer:
            layers += [conv(in_channels, ndf, 1, bias=True, kernel=3), nn.LeakyReLU(0.2, inplace=True)]
        layers += [conv(ndf if full_res_layer else in_channels, ndf, 2, bias=True), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += block(ndf * prev, ndf * mult, 2)
        prev, mult = mult, min(2**n_layers, 8)
        layers += block(ndf * prev, ndf * mult, 1)
        layers.append(conv(ndf * mult, 1, 1, bias=True))
        self.model = nn.Sequential(*layers)

    def output_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the logits map for an input of spatial size ``spatial`` (may be <= 0 if too small)."""
        out = []
        for s in spatial:
            for _ in range(self.n_layers):
                s = s // 2  # k4 s2 p1: floor((s + 2 - 4) / 2) + 1
            out.append(s - 2)  # two k4 s1 p1 convs: -1 each
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, 1, X', Y', Z') logits."""
        if min(self.output_size(x.shape[2:])) < 1:
            raise ValueError(
                f"PatchDiscriminator3D: input spatial size {tuple(x.shape[2:])} is too small for n_layers="
                f"{self.n_layers}; every dimension must be >= {self.min_input_size}"
            )
        return self.model(x)
