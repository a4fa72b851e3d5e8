"""CycleGAN loss terms for 3D MRI -> CT translation, one module per family.

All tensors are 3D volumes of shape ``(B, C, X, Y, Z)`` with intensities in ``[-1, 1]``. Every loss module
carries a float attribute ``weight`` but its ``forward`` returns the **unweighted** loss; the
LightningModule multiplies by ``weight``, so each term's maths is testable on its own.

- :mod:`~mr2ct.losses.adversarial`: LSGAN (default) or vanilla GAN loss.
- :mod:`~mr2ct.losses.cycle`: cycle consistency (lambda_cycle) and identity (relative to lambda_cycle).
- :mod:`~mr2ct.losses.gradient`: gradient consistency, ``1 - GC(source, translated)`` (Hiasa et al. 2018).
- :mod:`~mr2ct.losses.mind`: MIND-SSC structure loss (Heinrich et al. 2012/2013).
- :mod:`~mr2ct.losses.paired`: supervised L1 on registered pairs (paired and semi-paired training).
- :mod:`~mr2ct.losses.perceptual`: VGG16 features on sampled 2D slices.
"""

from mr2ct.losses.adversarial import AdversarialLoss
from mr2ct.losses.cycle import CycleLoss, IdentityLoss
from mr2ct.losses.gradient import GradientConsistencyLoss, central_differences, gradient_correlation
from mr2ct.losses.mind import MINDLoss, mind_ssc
from mr2ct.losses.paired import PairedLoss
from mr2ct.losses.perceptual import PerceptualLoss

__all__ = [
    "AdversarialLoss",
    "CycleLoss",
    "IdentityLoss",
    "GradientConsistencyLoss",
    "gradient_correlation",
    "central_differences",
    "MINDLoss",
    "mind_ssc",
    "PairedLoss",
    "PerceptualLoss",
]
