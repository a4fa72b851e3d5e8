"""``python -m mr2ct.segment input=sCT.nii.gz output=bone.nii.gz``: a bone mask from a (synthetic) CT.

The segmentation itself is :mod:`mr2ct.evaluation.segmentation` (body mask, multi-Otsu, small components).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.evaluation.segmentation import METHODS, segment_bone, segment_params


def run(cfg: DictConfig) -> Path:
    """Segment ``cfg.input`` into ``cfg.output`` (uint8, the input's affine)."""
    from mr2ct.data.checks import check_volume
    from mr2ct.formats import nifti_header, output_suffix, read_volume, write_volume

    params = segment_params(cfg.bone)
    if params["method"] not in METHODS:
        raise ValueError(f"unknown segmentation method {params['method']!r}; choose one of {METHODS}")
    out = Path(cfg.output)
    output_suffix(out)  # an extension we cannot write: refused before any work
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output exists: {out} (pass overwrite=true to replace it)")
    volume, affine = read_volume(cfg.input)
    check_volume(volume, str(cfg.input))
    bone = segment_bone(volume, **params)
    header = nifti_header(cfg.input) if str(out).endswith((".nii", ".nii.gz")) else None
    write_volume(bone, affine, out, dtype="uint8", overwrite=bool(cfg.overwrite), header=header)
    print(f"mr2ct: wrote {out} ({int(bone.sum())} bone voxels, {params['method']})", flush=True)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="segment")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, FileExistsError, ValueError):
        run(cfg)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("segment")
