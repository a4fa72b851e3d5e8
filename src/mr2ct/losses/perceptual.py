"""Perceptual loss: VGG16 features (:mod:`mr2ct.nets.vgg`) of randomly sampled 2D slices of a volume and of its reconstruction."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mr2ct.losses._common import check_same_shape

from mr2ct.nets.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16_LAYERS, VGG16Features

__all__ = ["PerceptualLoss"]


class PerceptualLoss(nn.Module):
    r"""VGG16 perceptual loss on randomly sampled 2D slices of 3D volumes.

    For each spatial axis ``a`` in ``axes`` (0, 1, 2 = X, Y, Z) sample
    ``k_a = max(1, round(slice_fraction * n_a))`` distinct slice indices (``torch.randperm``,
    so seeded runs repeat; new indices each call, the same for ``real`` and
    ``reconstructed``). If ``max_slices`` is set and ``sum_a k_a > max_slices``, the budget
    ``max_slices`` is spread round-robin over the axes (random axis order), so at most
    ``max_slices`` slice positions are used per call. Every slice position is taken from
    every volume and channel of the batch, i.e. VGG sees ``B * C * sum_a k_a`` 2D images
    (memory bounded by the sample, not the volume size).

    Each 1-channel slice ``s`` in ``[-1, 1]`` is mapped to ``(s + 1) / 2``, repeated to 3
    channels and normalised with ImageNet mean/std. Then::

        L = mean_{(axis, layer)} criterion(phi_layer(real slices), phi_layer(rec slices))

    with ``criterion`` = mean L1 (default) or MSE, averaged over the axes that received
    slices and the requested ``layers`` (names as in :data:`VGG16_LAYERS`). Features of
    ``real`` are computed under ``torch.no_grad``.

    The VGG is frozen (``requires_grad=False``) and always in eval mode, also after
    ``.train()``. ``pretrained=True`` loads torchvision ImageNet weights from
    ``weights_path`` (``torch.load(weights_only=True)``); ``pretrained=False`` keeps the
    random initialisation (for tests). Each slice must be at least ``2**p`` pixels per side,
    where ``p`` is the number of max-pools before the deepest layer (2 for ``relu3_3``).

    After each call ``last_num_slices`` holds the number of slice positions used and
    ``last_slice_indices`` maps each axis to its sampled indices.
    """

    CONFIG_KEY = "loss.perceptual.weights_path"

    def __init__(
        self,
        weight: float = 1.0,
        slice_fraction: float = 0.1,
        axes: Sequence[int] = (0, 1, 2),
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3"),
        weights_path: str | os.PathLike | None = None,
        pretrained: bool = False,
        max_slices: int | None = None,
        criterion: str = "l1",
    ) -> None:
        super().__init__()
        self.weight = float(weight)
        if not 0.0 < float(slice_fraction) <= 1.0:
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction}")
        self.slice_fraction = float(slice_fraction)
        axes = tuple(int(a) for a in axes)
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct values from (0, 1, 2), got {axes}")
        self.axes = axes
        layers = tuple(layers)
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if not layers or unknown:
            raise ValueError(f"unknown VGG16 layer(s) {unknown}; choose from {sorted(VGG16_LAYERS)}")
        self.layers = layers
        self.layer_indices = tuple(VGG16_LAYERS[name] for name in layers)
        if max_slices is not None and int(max_slices) < 1:
            raise ValueError(f"max_slices must be >= 1 or None, got {max_slices}")
        self.max_slices = None if max_slices is None else int(max_slices)
        if criterion not in ("l1", "mse"):
            raise ValueError(f"criterion must be 'l1' or 'mse', got {criterion!r}")
        self.criterion = criterion
        self.weights_path = None if weights_path is None else str(weights_path)
        self.pretrained = bool(pretrained)

        self.vgg = VGG16Features(last_index=max(self.layer_indices))
        if self.pretrained:
            self._load_pretrained(self.weights_path)
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.vgg.eval()

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.last_num_slices: int = 0
        self.last_slice_indices: dict[int, Tensor] = {}

    def _load_pretrained(self, path: str | None) -> None:
        if path is None or not os.path.isfile(path):
            where = "is not set" if path is None else f"points to a missing file: {path!r}"
            raise FileNotFoundError(
                f"PerceptualLoss(pretrained=True) needs ImageNet VGG16 weights, but `{self.CONFIG_KEY}` {where}. "
                f"Set `{self.CONFIG_KEY}=/path/to/vgg16.pth` (a torchvision-format state dict). To obtain it, on a "
                "machine with torchvision and internet run: python -c \"import torch, torchvision; "
                "torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')\" "
                "and copy vgg16.pth here. Or set loss.perceptual.pretrained=false (random features)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.vgg.load_torchvision_state_dict(state)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # frozen feature extractor: always eval
        return self

    def _slice_counts(self, sizes: Sequence[int]) -> list[int]:
        counts = [max(1, round(self.slice_fraction * n)) for n in sizes]
        counts = [min(c, n) for c, n in zip(counts, sizes)]
        if self.max_slices is None or sum(counts) <= self.max_slices:
            return counts
        alloc = [0] * len(counts)
        budget = self.max_slices
        order = torch.randperm(len(counts)).tolist()
        while budget > 0:
            for i in order:
                if budget > 0 and alloc[i] < counts[i]:
                    alloc[i] += 1
                    budget -= 1
        return alloc

    def _to_vgg_input(self, x: Tensor) -> Tensor:
        # x: (N, 1, H, W) in [-1, 1]
        x = (x + 1.0) * 0.5
        x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @staticmethod
    def _take_slices(vol: Tensor, axis: int, idx: Tensor) -> Tensor:
        # vol: (B, C, X, Y, Z) -> (B*C*k, 1, H, W)
        dim = 2 + axis
        s = vol.index_select(dim, idx)  # (B, C, ..k.., ...)
        s = s.movedim(dim, 2)  # (B, C, k, H, W)
        return s.reshape(-1, 1, s.shape[-2], s.shape[-1])

    def forward(self, real: Tensor, reconstructed: Tensor) -> Tensor:
        check_same_shape(real, reconstructed, "real", "reconstructed")
        if real.dim() != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) volumes, got shape {tuple(real.shape)}")
        self.vgg.eval()
        sizes = [real.shape[2 + a] for a in self.axes]
        counts = self._slice_counts(sizes)
        terms: list[Tensor] = []
        self.last_slice_indices = {}
        for axis, n, k in zip(self.axes, sizes, counts):
            if k == 0:
                continue
            idx = torch.randperm(n)[:k].sort().values.to(real.device)
            self.last_slice_indices[axis] = idx
            with torch.no_grad():
                f_real = self.vgg(self._to_vgg_input(self._take_slices(real, axis, idx)), self.layer_indices)
            f_rec = self.vgg(self._to_vgg_input(self._take_slices(reconstructed, axis, idx)), self.layer_indices)
            for fr, fx in zip(f_real, f_rec):
                if self.criterion == "l1":
                    terms.append(F.l1_loss(fx, fr))
                else:
                    terms.append(F.mse_loss(fx, fr))
        self.last_num_slices = int(sum(counts))
        return torch.stack(terms).mean()

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, slice_fraction={self.slice_fraction}, axes={self.axes}, layers={self.layers}, "
            f"max_slices={self.max_slices}, criterion={self.criterion!r}, pretrained={self.pretrained}"
        )
