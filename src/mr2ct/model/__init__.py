"""The CycleGAN LightningModule, its optimisation step, optimizers and history pool."""

from __future__ import annotations

import importlib
from typing import Any

# loaded on first use: mr2ct.model.step (what the profilers import) must not pull in Lightning and MONAI
_LAZY = {"CycleGAN": "mr2ct.model.cyclegan", "linear_decay": "mr2ct.model.cyclegan", "ImagePool": "mr2ct.model.pool"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
