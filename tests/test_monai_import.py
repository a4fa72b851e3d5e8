"""MONAI's import-time scan does not pull the optional packages mr2ct never uses through it (mr2ct.monai_import)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import mr2ct  # installs the finder, as any mr2ct import does
from monai.inferers import sliding_window_inference  # noqa: F401  (imports all of MONAI)
from monai.apps.auto3dseg import hpo_gen
from monai.handlers import mlflow_handler
from monai.data import ultrasound_confidence_map
from monai.metrics import panoptic_quality
seen_by_monai = {"optuna": bool(hpo_gen.has_optuna), "mlflow": mlflow_handler.mlflow.__class__.__name__ != "_LazyRaise",
                 "scipy.signal": ultrasound_confidence_map.hilbert.__class__.__name__ != "_LazyRaise",
                 "scipy.optimize": panoptic_quality.linear_sum_assignment.__class__.__name__ != "_LazyRaise"}
loaded_after_monai = sorted(m for m in ("optuna", "mlflow", "matplotlib", "scipy.signal", "scipy.stats", "scipy.optimize", "scipy.sparse",
                                              "scipy.spatial", "tensorboard") if m in sys.modules)
import mlflow, optuna, matplotlib.pyplot, scipy.signal, scipy.optimize, torch.utils.tensorboard  # noqa: E401,F401  (every other importer still gets them)
print(json.dumps({"seen": seen_by_monai, "loaded": loaded_after_monai,
                  "direct": [m in sys.modules for m in ("mlflow", "optuna", "scipy.signal", "scipy.optimize", "tensorboard")]}))
"""


def test_monai_scan_skips_optional_integrations_and_others_still_import_them():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    got = json.loads(out)
    assert got["loaded"] == [], f"MONAI's import pulled {got['loaded']}"
    assert got["seen"] == {"optuna": False, "mlflow": False, "scipy.signal": False, "scipy.optimize": False}
    assert got["direct"] == [True, True, True, True, True]
