"""Data: the embedded spine phantom, NIfTI folders, MONAI transform chains."""

from __future__ import annotations

import importlib
from typing import Any

# the data modules (and Lightning with them) load on first use: translate and segment read volumes through
# mr2ct.data.transforms/checks and must not pay for the training stack
_LAZY = {**{name: "mr2ct.data.datamodules" for name in ("CycleGANDataModule", "NiftiDataModule", "PhantomDataModule")},
         "TrainPatches": "mr2ct.data.patches"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
