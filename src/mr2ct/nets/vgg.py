"""The VGG16 convolutional trunk (torchvision layout) whose features the perceptual loss compares."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["VGG16Features", "VGG16_LAYERS", "IMAGENET_MEAN", "IMAGENET_STD"]


_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_layer_names() -> dict[str, int]:
    names: dict[str, int] = {}
    idx, block, conv = 0, 1, 0
    for v in _VGG16_CFG:
        if v == "M":
            names[f"pool{block}"] = idx
            idx += 1
            block += 1
            conv = 0
        else:
            conv += 1
            names[f"conv{block}_{conv}"] = idx
            names[f"relu{block}_{conv}"] = idx + 1
            idx += 2
    return names


#: layer name -> index in ``features`` (torchvision layout), e.g. ``relu1_2 -> 3``,
#: ``relu2_2 -> 8``, ``relu3_3 -> 15``, ``relu4_3 -> 22``, ``relu5_3 -> 29``.
VGG16_LAYERS: dict[str, int] = _vgg16_layer_names()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk with torchvision's ``features`` layout, truncated.

    ``self.features`` is an ``nn.Sequential`` whose indices match
    ``torchvision.models.vgg16().features``, built only up to index ``last_index``
    (inclusive), so a torchvision state dict loads with :meth:`load_torchvision_state_dict`.
    ReLUs are not in-place (no parameters, so the state-dict layout is unchanged).
    """

    def __init__(self, last_index: int = 30) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1))
                layers.append(nn.ReLU(inplace=False))
                in_ch = int(v)
        if not 0 <= last_index < len(layers):
            raise ValueError(f"last_index must be in [0, {len(layers) - 1}], got {last_index}")
        self.features = nn.Sequential(*layers[: last_index + 1])
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's VGG.
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def load_torchvision_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torchvision-format VGG16 state dict (``features.N.weight`` ...).

        ``classifier.*`` keys and ``features`` layers beyond the truncation are ignored; a
        leading ``module.`` (DataParallel) prefix is stripped. Missing keys for the built
        layers raise (strict loading).
        """
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        n = len(self.features)
        filtered: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            k = key[len("module.") :] if key.startswith("module.") else key
            parts = k.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) < n:
                filtered[k] = value
        self.load_state_dict(filtered, strict=True)

    def forward(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Run the trunk, returning the outputs of the layers at ``indices`` (in order given)."""
        wanted = set(indices)
        out: dict[int, Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out[i] = x
        return [out[i] for i in indices]
