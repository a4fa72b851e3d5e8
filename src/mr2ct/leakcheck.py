"""``python -m mr2ct.leakcheck train=DIR test=DIR``: training volumes that are near-copies of test volumes.

Exit status: 0 clean, 1 leaks found, 2 usage error (``mr2ct: error: ...``). The detector (signatures,
rotations, scores) is :mod:`mr2ct.data.leaks`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.data.leaks import check, format_leaks, settings_from
from mr2ct.formats import list_volumes


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="leakcheck")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, ValueError):
        if not cfg.get("train") or not cfg.get("test"):
            raise FileNotFoundError("leakcheck needs train=DIR and test=DIR (folders of .nii/.nii.gz)")
        leaks = check([(list_volumes(cfg.train), list_volumes(cfg.test))], settings_from(cfg))
    if leaks:
        print(format_leaks(leaks), flush=True)
        sys.exit(1)
    print("mr2ct leakcheck: no near-copies of test volumes in the training data", flush=True)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("leakcheck")
