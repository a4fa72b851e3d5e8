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

    With ``bone_weight`` > 0 the MRI -> CT term is a weighted mean: voxels where the true CT is above
    ``bone_hu`` count ``1 + bone_weight`` times. Bone is a small share of the body, and where a thin cortical
    shell's position is uncertain by a voxel, the plain L1 optimum is the soft tissue beside it: the shell
    comes out dim.

    Args:
        weight: weight of the term (same scale as lambda_cycle).
        reverse: also supervise the CT -> MRI generator (never bone-weighted: its target is an MRI).
        bone_weight: extra weight of the true CT's bone voxels (0: plain L1).
        bone_hu: the HU above which a true CT voxel counts as bone; the model converts it to its CT scale.

    Shapes: ``pred``, ``target`` (B, C, X, Y, Z); ``mask`` (B, 1, X, Y, Z) or None; returns a scalar.
    """

    def __init__(self, weight: float = 10.0, reverse: bool = False, bone_weight: float = 0.0, bone_hu: float = 200.0) -> None:
        super().__init__()
        self.weight, self.reverse = float(weight), bool(reverse)
        self.bone_weight, self.bone_hu = float(bone_weight), float(bone_hu)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None, bone_level: float | None = None) -> Tensor:
        """``bone_level``: ``bone_hu`` on the target's scale; None (the reverse direction) weighs every voxel alike."""
        check_same_shape(pred, target, "pred", "target")
        error = (pred - target).abs()
        if not self.bone_weight or bone_level is None:
            return masked_mean(error, mask)
        weights = 1.0 + self.bone_weight * (target > bone_level).to(error.dtype)
        if mask is not None:
            weights = weights * mask.to(error.dtype)
        return (error * weights).sum() / weights.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reverse={self.reverse}, bone_weight={self.bone_weight}, bone_hu={self.bone_hu}"
