"""Adversarial loss: least-squares (Mao et al. 2017, as in CycleGAN) or vanilla GAN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdversarialLoss"]


class AdversarialLoss(nn.Module):
    r"""GAN loss on discriminator outputs.

    ``mode="lsgan"`` (Mao et al. 2017, used by CycleGAN)::

        L(D(x), real) = mean((D(x) - 1)^2)
        L(D(x), fake) = mean(D(x)^2)

    ``mode="vanilla"``: binary cross-entropy with logits against an all-ones (real) or
    all-zeros (fake) target, i.e. ``mean(softplus(-D(x)))`` for real and
    ``mean(softplus(D(x)))`` for fake.

    ``pred`` may be a single tensor or a sequence of tensors (MONAI's
    ``PatchDiscriminator`` returns the intermediate features with the logits *last*);
    for a sequence only the last element is used.

    Generator loss: ``loss(D(G(x)), True)``.
    Discriminator loss: :meth:`discriminator_loss`
    ``= 0.5 * (loss(D(y), True) + loss(D(G(x)), False))`` (halved, as in CycleGAN).
    """

    MODES = ("lsgan", "vanilla")

    def __init__(self, weight: float = 1.0, mode: str = "lsgan") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"AdversarialLoss mode must be one of {self.MODES}, got {mode!r}")
        self.weight = float(weight)
        self.mode = mode

    @staticmethod
    def _select(pred: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(pred, Tensor):
            return pred
        if isinstance(pred, Sequence) and len(pred) > 0:
            last = pred[-1]
            if not isinstance(last, Tensor):
                raise TypeError(f"last element of the prediction sequence must be a Tensor, got {type(last)}")
            return last
        raise TypeError(f"pred must be a Tensor or a non-empty sequence of Tensors, got {type(pred)}")

    def forward(self, pred: Tensor | Sequence[Tensor], target_is_real: bool) -> Tensor:
        p = self._select(pred)
        target = torch.full_like(p, 1.0 if target_is_real else 0.0)
        if self.mode == "lsgan":
            return F.mse_loss(p, target)
        return F.binary_cross_entropy_with_logits(p, target)

    def discriminator_loss(self, pred_real: Tensor | Sequence[Tensor], pred_fake: Tensor | Sequence[Tensor]) -> Tensor:
        """``0.5 * (loss(pred_real, True) + loss(pred_fake, False))``.

        ``pred_fake`` should come from a *detached* generator output (or an image pool).
        """
        return 0.5 * (self(pred_real, True) + self(pred_fake, False))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, mode={self.mode!r}"
