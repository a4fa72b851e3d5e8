"""Supervised term for registered MRI-CT pairs: L1 between a translation and the true image of the same crop."""

from __future__ import annotations

from torch import Tensor, nn

from mr2ct.losses._common import check_same_shape, masked_mean

__all__ = ["PairedLoss"]


class PairedLoss(nn.Module):
    r"""``mean |G_ab(a) - b|`` over the body voxels of a paired crop (and ``|G_ba(b) - a|`` with ``reverse``).

    Only samples of a batch that come from a registered pair contribute (the model selects them); the
    unpaired losses keep training on everything. With pairs only, this is 3D pix2pix-style supervision
    next to the cycle; with a few pairs among many unpaired volumes, semi-supervised training.

    Args:
        weight: weight of the term (same scale as lambda_cycle).
        reverse: also supervise the CT -> MRI generator.

    Shapes: ``pred``, ``target`` (B, C, X, Y, Z); ``mask`` (B, 1, X, Y, Z) or None; returns a scalar.
    """

    def __init__(self, weight: float = 10.0, reverse: bool = False) -> None:
        super().__init__()
        self.weight, self.reverse = float(weight), bool(reverse)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        check_same_shape(pred, target, "pred", "target")
        return masked_mean((pred - target).abs(), mask)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reverse={self.reverse}"
