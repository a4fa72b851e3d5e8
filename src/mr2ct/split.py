"""``python -m mr2ct.split input=DIR [test_fraction=0.2 seed=0]``: a leakage-safe split by source subject.

Whole subjects go to validation and test, so every augmented copy of a subject lands on one side; the
split is written as JSON and read by ``data=nifti data.split_file=...``. See :mod:`mr2ct.data.splits`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.data.splits import make_split, write_split


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="split")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, FileExistsError, ValueError):
        split = make_split(
            cfg.input, cfg.a, cfg.b, cfg.get("bone"), cfg.get("manifest"), cfg.pattern,
            float(cfg.test_fraction), float(cfg.val_fraction), int(cfg.seed),
        )
        out = write_split(split, cfg.output or Path(cfg.input) / "split.json", overwrite=bool(cfg.overwrite))
    s = split["subjects"]
    print(
        f"mr2ct split: {len(s['train'])} train / {len(s['val'])} val / {len(s['test'])} test subjects; "
        f"{len(split['train_a'])} + {len(split['train_b'])} training files, {len(split['val'])} val and "
        f"{len(split['test'])} test pairs, {len(split['excluded'])} excluded copies -> {out}\n"
        f"train with: python -m mr2ct.train data=nifti data.split_file={out}",
        flush=True,
    )


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("split")
