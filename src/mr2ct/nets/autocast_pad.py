"""Padded convolutions under autocast: pad in the autocast dtype instead of float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AutocastPadConv3d"]


class AutocastPadConv3d(nn.Conv3d):
    """``nn.Conv3d`` that pads in the autocast dtype: autocast runs replicate and reflect padding in float32, so a
    bf16 run would cast every padded input up, pad it, and cast it back down for the convolution. The same outputs
    (padding copies values, so it commutes with the cast); the input's gradient differs by the rounding of the
    border sums of the padding's backward, done in the autocast dtype."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        kind = x.device.type
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else None
        # autocast leaves other input dtypes (float64) as they are
        if not autocast or self.padding_mode == "zeros" or isinstance(self.padding, str) or x.dtype not in (torch.float32, dtype):
            return super()._conv_forward(x, weight, bias)
        with torch.autocast(kind, enabled=False):
            x = F.pad(x.to(dtype), self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return F.conv3d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
