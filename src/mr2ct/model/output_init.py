"""Where the generators start: at their target domain's median body intensity instead of the window's middle.

The CycleGAN initialisation leaves a generator's output near 0, the middle of the intensity window: for the
default CT window (-1024..3000 HU) that is ~990 HU, bone. ``model.output_init=body_median`` shifts each
generator's output bias at the start of a new fit so that it writes the median body intensity of its target
domain (soft tissue in CT), measured on training patches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mr2ct.nets import init_output_level, output_conv

__all__ = ["body_medians", "start_at_body_median"]


def body_medians(train: Any, n: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Median normalised intensity of the body voxels of ``n`` training samples per domain (``{"a", "b"}``), and
    one sample's patch per domain, (1, 1, X, Y, Z), to measure the generators' untrained output on.

    ``train`` yields samples (or lists of samples) with ``a``, ``b``, ``mask_a``, ``mask_b``
    (:class:`mr2ct.data.patches.TrainPatches`); voxels outside the masks (air) are left out.
    """
    values: dict[str, list[Tensor]] = {"a": [], "b": []}
    examples: dict[str, Tensor] = {}
    for i in range(max(1, int(n))):
        item = train[i % len(train)]
        for sample in item if isinstance(item, list) else [item]:
            for k in values:
                # as plain tensors: MONAI's MetaTensor would carry its metadata into every result
                x, m = sample[k].as_subclass(Tensor).float(), sample[f"mask_{k}"].as_subclass(Tensor) > 0.5
                values[k].append(x[m] if m.any() else x.flatten())
                examples.setdefault(k, x[None] if x.dim() == 4 else x)
    return {k: float(torch.cat(v).median()) for k, v in values.items()}, examples


def start_at_body_median(model: nn.Module, train: Any, n: int, broadcast: Callable[..., Any]) -> dict[str, float]:
    """Set ``model.g_ab`` to start at the CT body median and ``model.g_ba`` at the MRI's; returns the levels.

    ``broadcast(obj, src=0)`` (the Lightning strategy's) makes every DDP rank take rank 0's numbers, since each
    rank draws its own patches.
    """
    levels, examples = body_medians(train, n)
    biases = {name: init_output_level(getattr(model, name), levels[target], examples[source])
              for name, source, target in (("g_ab", "a", "b"), ("g_ba", "b", "a"))}
    biases, levels = broadcast((biases, levels), src=0)
    with torch.no_grad():
        for name, bias in biases.items():
            output_conv(getattr(model, name)).bias.fill_(bias)
    return levels
