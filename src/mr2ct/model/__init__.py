"""The CycleGAN LightningModule and its history pool."""

from mr2ct.model.cyclegan import CycleGAN, linear_decay
from mr2ct.model.pool import ImagePool

__all__ = ["CycleGAN", "ImagePool", "linear_decay"]
