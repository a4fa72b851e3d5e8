"""Cycle-consistency and identity losses (Zhu et al. 2017): L1 between a volume and its round trip / its image under the generator of its own domain."""

from __future__ import annotations

from torch import Tensor, nn

from mr2ct.losses._common import check_same_shape, masked_mean

__all__ = ["CycleLoss", "IdentityLoss"]


class CycleLoss(nn.Module):
    r"""Cycle-consistency loss ``mean |real - reconstructed|`` (L1; over the voxels of ``mask`` when given).

    ``reconstructed = F(G(real))``. ``weight`` is lambda_cycle (default 10.0).
    """

    def __init__(self, weight: float = 10.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, real: Tensor, reconstructed: Tensor, mask: Tensor | None = None) -> Tensor:
        check_same_shape(real, reconstructed, "real", "reconstructed")
        return masked_mean((reconstructed - real).abs(), mask)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class IdentityLoss(nn.Module):
    r"""Identity loss ``mean |real - G(real)|`` (L1, in ``mask`` when given), ``real`` from G's *target* domain.

    ``weight`` is lambda_identity (default 0.5) and is **relative**: the model applies
    ``lambda_identity * lambda_cycle`` (as in the CycleGAN reference implementation).
    """

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, real: Tensor, same: Tensor, mask: Tensor | None = None) -> Tensor:
        check_same_shape(real, same, "real", "same")
        return masked_mean((same - real).abs(), mask)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
