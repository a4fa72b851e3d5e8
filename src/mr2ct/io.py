"""Files in and out: NIfTI volumes with their affine, generators from training checkpoints.

Checkpoint loading lives in one function, :func:`load_generator`, so how checkpoints are trusted and
read is decided in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from mr2ct.export import build_generator, check_state_dict_compatible, load_exported, safe_torch_load

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_DTYPES = {"float32": np.float32, "int16": np.int16, "uint8": np.uint8}


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_nifti(folder: str | Path) -> list[Path]:
    """The NIfTI files of ``folder``, sorted; a clear error for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder does not exist: {folder}")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no .nii/.nii.gz files in data folder: {folder}")
    return files


def read_nifti(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A 3-D NIfTI volume as float32 (X, Y, Z) in voxel order, and the image (affine, header).

    Trailing singleton dimensions (X, Y, Z, 1) are dropped; other 4-D images are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, image


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write ``array`` (X, Y, Z) with exactly ``affine``; refuses to replace a file unless ``overwrite``.

    ``dtype``: float32, int16 (rounded and clipped to the int16 range) or uint8 (boolean masks: 0/1). ``header``: the
    input's header, so the qform/sform codes and units carry over; intensity scaling is reset.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output exists: {path} (pass overwrite=true to replace it)")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    np_dtype = OUTPUT_DTYPES[dtype]
    arr = np.asarray(array)
    if arr.dtype == np.bool_:  # masks: rint/clip below do not take booleans
        arr = arr.astype(np.uint8)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    arr = arr.astype(np_dtype)
    hdr = header.copy() if header is not None else None
    image = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    image.header.set_data_dtype(np_dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        # keep the input's codes (scanner / aligned ...): readers pick the affine by them
        image.set_sform(affine, code=int(hdr["sform_code"]) or 2)
        image.set_qform(affine, code=int(hdr["qform_code"]) or 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def load_generator(ckpt_path: str | Path, direction: str = "a2b", map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild one generator of a training checkpoint: (generator in eval mode, the run's config dict).

    The checkpoint holds the resolved training config under ``mr2ct_config`` (written by
    ``CycleGAN.on_save_checkpoint``); its ``generator`` entry is instantiated and the ``g_ab``
    (``direction="a2b"``, MRI->CT) or ``g_ba`` weights loaded. Read with ``weights_only=True``: a
    checkpoint cannot run code when it is loaded.
    """
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
    path = Path(ckpt_path)
    if path.name.endswith(".safetensors"):  # exported by `python -m mr2ct.export`: no pickle at all
        return load_exported(path, direction, map_location)
    ckpt = safe_torch_load(path, map_location)  # missing, corrupt or code-carrying files: one clear error
    run_config = ckpt.get("mr2ct_config") if isinstance(ckpt, dict) else None
    if not run_config or "generator" not in run_config:
        raise ValueError(f"{path} holds no mr2ct_config: not a checkpoint written by `python -m mr2ct.train`")
    generator = build_generator(run_config["generator"], path)  # only mr2ct.nets classes, never any _target_
    prefix = "g_ab." if direction == "a2b" else "g_ba."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no {prefix[:-1]} weights")
    check_state_dict_compatible(generator.state_dict(), state, str(path), "generator")
    generator.load_state_dict(state)
    return generator.eval(), run_config
