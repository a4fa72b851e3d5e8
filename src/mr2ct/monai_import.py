"""Import MONAI without the optional integrations that mr2ct never reaches through MONAI.

``import monai`` (and so any ``from monai.x import y``) imports every MONAI submodule, and each of them
imports at module level whatever optional package it could use if installed. With the ``test`` / ``mlflow`` /
``search`` extras present, that pulls Optuna (auto3dseg's HPO), MLflow (its MLFlowHandler), pandas (CSV
datasets) and matplotlib (visualize); with the base install, SciPy's signal, statistics, sparse, optimisation
and spatial modules and TensorBoard (Ignite handlers): resident memory and start-up time in every process that
reads a volume, none of it used (figures: README, "Memory and speed").

:func:`install` puts a finder in front of ``sys.meta_path`` that refuses :data:`SKIPPED` to MONAI's own
modules while ``monai/__init__`` is still running, the same answer MONAI gets on a base install
without those packages; MONAI records them as unavailable for the features above. Every other importer
(Lightning's MLFlowLogger, Hydra's Optuna sweeper, our pictures) imports them as usual, before or after,
and MONAI's own imports made at call time are untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

#: modules MONAI's import-time scan does not get (mr2ct uses none of the MONAI features needing them): full
#: dotted names as MONAI asks for them. scipy.signal (with scipy.stats behind it) serves only the ultrasound
#: confidence map and the 1-D signal transforms, scipy.sparse that map and DiNTS, scipy.optimize panoptic
#: quality, scipy.spatial the sub-voxel surface distances; TensorBoard only MONAI's Ignite handlers and image
#: summaries.
SKIPPED = frozenset({"optuna", "mlflow", "pandas", "matplotlib", "scipy.signal", "scipy.optimize", "scipy.sparse", "scipy.spatial", "tensorboard", "torch.utils.tensorboard"})


def _monai_initialising() -> bool:
    monai = sys.modules.get("monai")
    return monai is not None and not hasattr(monai, "__all__")  # monai/__init__ sets __all__ after its scan


def _module_of(frame) -> str:  # noqa: ANN001 (a frame)
    return frame.f_globals.get("__name__", "")


def _requested_by_monai() -> bool:
    """Whether the import being resolved was asked for by a MONAI module (the first frame outside importlib and this one)."""
    frame = sys._getframe(1)
    while frame is not None and (_module_of(frame) == __name__ or _module_of(frame).split(".")[0] in ("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame is not None and _module_of(frame).split(".")[0] == "monai"


class SkipForMonai:
    """A ``sys.meta_path`` finder: :data:`SKIPPED` packages are not found while MONAI scans its submodules."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name in SKIPPED and _monai_initialising() and _requested_by_monai():
            raise ModuleNotFoundError(f"{name} is not offered to MONAI's import-time scan (mr2ct.monai_import)", name=name)
        return None


def install() -> None:
    """Put :class:`SkipForMonai` first in ``sys.meta_path`` (once); a no-op when MONAI is already imported."""
    if "monai" in sys.modules or any(isinstance(f, SkipForMonai) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, SkipForMonai())
