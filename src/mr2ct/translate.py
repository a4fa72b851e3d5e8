"""Translate whole volumes with a trained generator: ``python -m mr2ct.translate ckpt=... input=... output=...``.

Examples::

    python -m mr2ct.translate ckpt=outputs/train/runs/X/checkpoints/last.ckpt input=mri.nii.gz output=sct.nii.gz
    python -m mr2ct.translate ckpt=... input=mri.mha output=sct.mha                 # MetaImage in and out
    python -m mr2ct.translate ckpt=... input=dicom/series_dir output=sct.nii.gz     # a DICOM series
    python -m mr2ct.translate ckpt=... input=mri_folder/ output=sct_folder/ segment=true device=cuda
    python -m mr2ct.translate ckpt=... input=ct.nii.gz output=smri.nii.gz direction=b2a

Inputs: NIfTI, MetaImage, NRRD, DICOM series (:mod:`mr2ct.formats`); an output takes the format of its
extension; in a folder run each output keeps its input's format (DICOM gives ``.nii.gz``). A bad file in
a folder run is reported and skipped; the run exits non-zero at the end.

The training preprocessing is applied and inverted on the way out (MONAI invertible transforms):
reorientation to the training orientation, resampling to the training spacing when the run resampled
(NIfTI data with ``data.spacing``), intensity normalisation (MRI percentiles / CT window). The output
has the input's shape, affine and voxel order; a synthetic CT is in HU. Memory is bounded by the
sliding window (``roi_size``, ``sw_batch_size``), not by the volume: windows run on ``device`` and are
stitched on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mr2ct.checkpoints import load_generator
from mr2ct.cli import exit_on_user_error
from mr2ct.config import CONFIG_DIR
from mr2ct.data.checks import check_volume
from mr2ct.errors import InputError
from mr2ct.evaluation.segmentation import segment_bone, segment_params
from mr2ct.formats import (
    NIFTI_SUFFIXES, READ_SUFFIXES, SERIES_SEP, WRITE_SUFFIXES, dicom_series, is_dicom_folder, list_volumes, nifti_header, output_suffix, read_volume, volume_stem, volume_suffix, write_volume,
)
from mr2ct.inference import Preprocessing, bound_cpu_heap, inference_numerics, resolve_device, translate_array



def _split_suffix(output: Path) -> tuple[str, str]:
    suffix = output_suffix(output)
    return output.name[: -len(suffix)], suffix


def bone_path(output: Path) -> Path:
    """``sct.nii.gz`` -> ``sct_bone.nii.gz`` (beside the synthetic CT, same format)."""
    stem, suffix = _split_suffix(output)
    return output.with_name(stem + "_bone" + suffix)


def preview_path(output: Path) -> Path:
    """``sct.nii.gz`` -> ``sct_preview.png`` (beside the synthetic CT)."""
    return output.with_name(_split_suffix(output)[0] + "_preview.png")


def output_name(src: Path) -> str:
    """A folder run's output name: the input's stem and format; DICOM and detached headers give a single file."""
    suffix = volume_suffix(src)
    suffix = {".mhd": ".mha", ".nhdr": ".nrrd", None: ".nii.gz"}.get(suffix, suffix)
    return volume_stem(src) + suffix


def plan_outputs(input_path: Path, output_path: Path) -> list[tuple[Path, Path]]:
    """(input volume, output file) pairs: a volume to a file (or into a folder), a folder to a folder.

    A volume is a file of a readable format, a folder holding one DICOM series, or ``folder#SeriesUID``.
    """
    named_series = SERIES_SEP in str(input_path)
    if is_dicom_folder(input_path) and not named_series:
        uids = sorted(dicom_series(input_path))
        if len(uids) > 1:  # several series: each one volume, so the output is a folder
            return _into_folder([Path(f"{input_path}{SERIES_SEP}{u}") for u in uids], output_path, input_path)
    elif not named_series and not input_path.is_file():
        if not input_path.exists():
            raise FileNotFoundError(f"input not found: {input_path}")
        return _into_folder(list_volumes(input_path), output_path, input_path)
    if input_path.is_file() and volume_suffix(input_path) is None:
        raise InputError(f"{input_path}: unknown file type (read: {', '.join(READ_SUFFIXES)} files and DICOM series folders)")
    if output_path.is_dir() or "." not in output_path.name:
        return [(input_path, output_path / output_name(input_path))]
    output_suffix(output_path)  # an extension we cannot write: refused before any work
    return [(input_path, output_path)]


def _into_folder(inputs: list[Path], output_path: Path, input_path: Path) -> list[tuple[Path, Path]]:
    if output_path.exists() and not output_path.is_dir():
        raise ValueError(f"input {input_path} holds several volumes, so output must be a folder: {output_path}")
    if any(output_path.name.lower().endswith(s) for s in WRITE_SUFFIXES):
        raise ValueError(f"input {input_path} holds several volumes, so output must be a folder, not {output_path.name}")
    return [(p, output_path / output_name(p)) for p in inputs]


def run(cfg: DictConfig) -> list[Path]:
    """Translate every input of ``cfg``; returns the written files."""
    if cfg.direction not in ("a2b", "b2a"):
        raise ValueError(f"direction must be a2b or b2a, got {cfg.direction!r}")
    if cfg.dtype not in ("float32", "int16"):
        raise ValueError(f"dtype must be float32 or int16, got {cfg.dtype!r}")
    if cfg.segment and cfg.direction != "a2b":
        raise ValueError("segment=true needs direction=a2b (bone is segmented on a synthetic CT)")
    pairs = plan_outputs(Path(cfg.input), Path(cfg.output))
    targets = [out for _, out in pairs] + ([bone_path(out) for _, out in pairs] if cfg.segment else [])
    targets += [preview_path(out) for _, out in pairs] if cfg.get("preview") else []
    existing = [str(t) for t in targets if t.exists()]
    if existing and not cfg.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"output exists: {existing[0]}{more} (pass overwrite=true to replace)")
    device = resolve_device(str(cfg.device))
    bound_cpu_heap(device, cfg.get("bounded_heap", True))
    generator, run_config = load_generator(cfg.ckpt, cfg.direction)
    precision, memory_format = inference_numerics(device, str(cfg.precision), str(cfg.memory_format), cfg.ckpt)
    prep = Preprocessing.from_run_config(run_config, OmegaConf.to_container(cfg.spacing) if OmegaConf.is_config(cfg.spacing) else cfg.spacing)
    roi = list(cfg.roi_size) if cfg.roi_size else list(run_config["data"]["patch_size"])
    # a CT written as int16 HU is exact to 1 HU; a synthetic MRI stays in normalised float units
    dtype = cfg.dtype if cfg.direction == "a2b" else "float32"
    params = segment_params(cfg.bone)
    written, failed = [], []
    # a bar over the files of a folder run (with ETA) on a terminal; quiet in logs and pipes
    files = tqdm(pairs, desc="volumes", unit="vol", disable=len(pairs) < 2 or not cfg.progress or not sys.stderr.isatty())
    for i, (src, dst) in enumerate(files, 1):
        t0 = time.perf_counter()
        try:
            volume, affine = read_volume(src)
            check_volume(volume, str(src))  # the checks training applies: finite, not degenerate
        except (ValueError, FileNotFoundError) as err:
            if len(pairs) == 1:
                raise
            print(f"mr2ct: error: {err}", file=sys.stderr, flush=True)
            failed.append(str(src))
            continue
        header = nifti_header(src) if str(dst).endswith(NIFTI_SUFFIXES) else None
        shape = volume.shape
        out = translate_array(
            generator, volume, affine, prep, roi, cfg.direction, float(cfg.overlap), cfg.sw_batch_size, str(cfg.mode), device,
            progress=bool(cfg.progress), precision=precision, memory_format=memory_format,
        )
        written.append(write_volume(out, affine, dst, dtype=dtype, overwrite=bool(cfg.overwrite), header=header))
        msg = f"[{i}/{len(pairs)}] {src} -> {dst}"
        if cfg.segment:
            bone = segment_bone(out, **params)
            written.append(write_volume(bone, affine, bone_path(dst), dtype="uint8", overwrite=bool(cfg.overwrite), header=header))
            msg += f" (+ {bone_path(dst).name}, {int(bone.sum())} bone voxels)"
        if cfg.get("preview") and cfg.direction == "a2b":
            from mr2ct.evaluation.pictures import preview_figure

            png = preview_path(dst)
            preview_figure(png, volume, out, bone if cfg.segment else None, title=f"{src.name} -> {dst.name}")
            msg += f" (+ {png.name})"
        del volume, out
        tqdm.write(f"{msg} {shape} in {time.perf_counter() - t0:.1f} s")
    if failed:
        raise InputError(f"{len(failed)} of {len(pairs)} inputs failed (reported above), {len(pairs) - len(failed)} translated: {', '.join(failed)}")
    return written



@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="translate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileNotFoundError, FileExistsError, ValueError):
        run(cfg)


if __name__ == "__main__":
    from mr2ct.cli import run_tool

    run_tool("translate")
