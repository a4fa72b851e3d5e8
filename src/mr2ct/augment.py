"""Offline augmentation with provenance (the original recipe): ``mr2ct-augment input=DIR output=DIR``
(or ``python -m mr2ct.augment``).

Writes each volume of ``in``, ``rotations`` rotated and ``noise_copies`` noisy copies to ``out`` with a
``manifest.csv``; see :mod:`mr2ct.data.augment` and conf/augment.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.data.augment import augment_folder


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="augment")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, FileExistsError, ValueError):
        rows = augment_folder(
            cfg.input, cfg.output, int(cfg.rotations), int(cfg.noise_copies), int(cfg.seed), float(cfg.rotation_std_deg),
            list(cfg.axes) if cfg.axes is not None else None, cfg.modality, list(cfg.ct_window), list(cfg.mri_percentiles),
            list(cfg.noise_mean_range), list(cfg.noise_stds), overwrite=bool(cfg.overwrite),
        )
    n_src = sum(r["augmentation"] == "original" for r in rows)
    print(f"mr2ct augment: {n_src} volumes -> {len(rows)} files in {cfg.output} (manifest.csv)", flush=True)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("augment")
