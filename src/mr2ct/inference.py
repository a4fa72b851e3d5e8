"""Whole-volume translation by sliding windows, shared by validation, translate and evaluate.

Memory is bounded by the window (``roi_size``) and ``sw_batch_size``, not by the volume: windows run on
``sw_device`` and are stitched with gaussian weights on ``device`` (MONAI's sliding_window_inference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference


@torch.no_grad()
def translate_volume(
    generator: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Translate ``volume`` (B, C, X, Y, Z) in normalised units; returns the same shape, on ``device``.

    Volumes smaller than the window are padded inside MONAI and cropped back.
    """
    return sliding_window_inference(
        volume,
        roi_size=[int(r) for r in roi_size],
        sw_batch_size=int(sw_batch_size),
        predictor=generator,
        overlap=float(overlap),
        mode=mode,
        padding_mode="replicate",
        sw_device=sw_device,
        device=device,
        progress=progress,
    )
