"""Networks of mr2ct: plain ``nn.Module``s (no Lightning, no Hydra) on (B, C, X, Y, Z) tensors."""

from mr2ct.nets.init import init_output_level, init_weights, output_conv
from mr2ct.nets.norms import monai_norm, norm_layer
from mr2ct.nets.patchgan import PatchDiscriminator3D
from mr2ct.nets.resnet import ResnetGenerator3D
from mr2ct.nets.unet import UNetGenerator

__all__ = [
    "UNetGenerator",
    "ResnetGenerator3D",
    "PatchDiscriminator3D",
    "init_weights",
    "init_output_level",
    "output_conv",
    "norm_layer",
    "monai_norm",
]
