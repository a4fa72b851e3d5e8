"""Volume files as users have them: NIfTI, MetaImage, NRRD and DICOM series, read and written by path.

Reading goes through MONAI's readers (``NibabelReader`` for NIfTI, ``ITKReader`` for the others, ITK's
GDCM for DICOM); every format gives the same thing: a float32 array in voxel order (X, Y, Z) and a 4x4
voxel-to-world affine in RAS millimetres, so a volume read from any format lines up with the same volume
read from another. Writing picks the format from the output path's extension.

A DICOM *series* is one volume. A folder holding one series is named by the folder; a folder holding
several is split by SeriesInstanceUID, each series named ``<folder>#<SeriesInstanceUID>``
(:func:`list_volumes` lists them so). Slices are ordered by their position along the slice normal and
checked: a missing slice, uneven spacing or mixed series where one volume is expected is refused.

Every problem is a :class:`VolumeError` whose message is one line naming the file.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from mr2ct.errors import InputError

__all__ = [
    "NIFTI_SUFFIXES",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "SERIES_SEP",
    "VolumeError",
    "volume_suffix",
    "volume_stem",
    "is_dicom_folder",
    "dicom_series",
    "list_volumes",
    "read_volume",
    "write_volume",
    "nifti_header",
    "output_suffix",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
#: detached headers (.mhd, .nhdr) are read, not written: one output path should be one file
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
SERIES_SEP = "#"
#: how far (relative to the median) one slice gap may differ before the series counts as uneven
SPACING_TOLERANCE = 0.01
OUTPUT_DTYPES = {"float32": np.float32, "int16": np.int16, "uint8": np.uint8}


class VolumeError(InputError):
    """A file that is not a usable 3D volume; the message names it."""


def volume_suffix(path: str | Path) -> str | None:
    """The format suffix of a file name (``.nii.gz``, ``.mha``, ...), ``None`` if it has none we read."""
    name = str(path).split(SERIES_SEP)[0].lower()
    return next((s for s in READ_SUFFIXES if name.endswith(s)), None)


def volume_stem(path: str | Path) -> str:
    """File name without its format suffix; a DICOM series: its folder's name (``+ _<SeriesNumber-or-UID>``)."""
    text = str(path)
    if SERIES_SEP in text:
        folder, uid = text.split(SERIES_SEP, 1)
        return f"{Path(folder).name}_{uid}"
    name = Path(text).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """A folder that directly holds DICOM files (``.dcm``, or the ``DICM`` preamble)."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and not p.name.startswith(".") and _is_dicom_file(p) for p in path.iterdir())


def _slice_normal(ds) -> np.ndarray:
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    return np.cross(row, col)


def dicom_series(folder: str | Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> that series' files ordered along the slice normal, each series checked.

    Raises :class:`VolumeError` for a folder without DICOM files, a single 2D slice, slices without
    geometry tags, a missing slice (a gap of about twice the others) or otherwise uneven spacing.
    """
    import pydicom

    folder = Path(folder)
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and _is_dicom_file(p):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception as err:  # pydicom raises many types for a damaged file
                raise VolumeError(f"{p}: not a readable DICOM file ({str(err).splitlines()[0][:160]})") from None
            groups[str(getattr(ds, "SeriesInstanceUID", "unknown"))].append((p, ds))
    if not groups:
        raise VolumeError(f"{folder}: no DICOM files in this folder")
    out = {}
    for uid, items in groups.items():
        first = items[0][1]
        if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:  # one multi-frame file holds the whole volume
            out[uid] = [p for p, _ in items]
            continue
        if len(items) < 2:
            raise VolumeError(f"{items[0][0]}: series {uid} holds one 2D slice, not a 3D volume")
        if any(not hasattr(ds, "ImagePositionPatient") or not hasattr(ds, "ImageOrientationPatient") for _, ds in items):
            raise VolumeError(f"{folder}: series {uid} has slices without ImagePositionPatient/ImageOrientationPatient")
        normal = _slice_normal(first)
        items.sort(key=lambda item: float(np.dot(normal, np.asarray(item[1].ImagePositionPatient, float))))
        pos = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for _, ds in items])
        gaps = np.diff(pos)
        step = float(np.median(gaps))
        if step <= 0:
            raise VolumeError(f"{folder}: series {uid} has slices at the same position (duplicates?)")
        bad = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step + 1e-3)
        if bad.size:
            i = int(bad[0])
            what = "missing slice" if abs(gaps[i] / step - round(gaps[i] / step)) < 0.05 and gaps[i] > 1.5 * step else "uneven slice spacing"
            raise VolumeError(
                f"{folder}: {what} in series {uid}: {gaps[i]:.3g} mm between {items[i][0].name} and {items[i + 1][0].name}, "
                f"{step:.3g} mm elsewhere"
            )
        out[uid] = [p for p, _ in items]
    return out


def list_volumes(folder: str | Path) -> list[Path]:
    """The volumes of ``folder``, sorted: files of every readable format, and DICOM series.

    DICOM files directly in ``folder`` are its series; each sub-folder holding DICOM files is one or more
    series. A folder with one series is named by the folder, one with several gives ``folder#UID`` each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder does not exist: {folder}")
    found: list[str] = []
    dicom_dirs = [folder] if is_dicom_folder(folder) else []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and volume_suffix(p.name) and not p.name.lower().endswith((".raw", ".zraw")):
            found.append(str(p))
        elif p.is_dir() and is_dicom_folder(p):
            dicom_dirs.append(p)
    for d in dicom_dirs:
        series = dicom_series(d)
        found += [str(d)] if len(series) == 1 else [f"{d}{SERIES_SEP}{uid}" for uid in sorted(series)]
    if not found:
        raise FileNotFoundError(
            f"no volumes in data folder: {folder} (read: {', '.join(READ_SUFFIXES)} files and DICOM series folders)"
        )
    return [Path(p) for p in sorted(found)]


def _dicom_files(spec: str) -> list[Path]:
    folder, _, uid = spec.partition(SERIES_SEP)
    series = dicom_series(folder)
    if uid:
        if uid not in series:
            raise VolumeError(f"{folder}: no series {uid} in this folder (series: {', '.join(sorted(series))})")
        return series[uid]
    if len(series) > 1:
        names = ", ".join(f"{folder}{SERIES_SEP}{u}" for u in sorted(series))
        raise VolumeError(f"{folder}: holds {len(series)} DICOM series where one volume is expected; name one: {names}")
    return next(iter(series.values()))


def format_name(path: str | Path) -> str:
    """NIfTI, MetaImage, NRRD or DICOM: for messages."""
    suffix = volume_suffix(path)
    if suffix is None:
        return "DICOM"
    return {".nii.gz": "NIfTI", ".nii": "NIfTI", ".mha": "MetaImage", ".mhd": "MetaImage"}.get(suffix, "NRRD")


def _quiet_monai_loggers() -> None:
    # MONAI's optional pydicom plugins log at import on every reader construction
    for name in ("monai.data.image_reader", "monai.apps.nvimagecodec", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z) float32, affine (4, 4) voxel -> RAS mm)`` of a volume file or DICOM series.

    Trailing singleton dimensions are dropped; anything else that is not 3D is refused.
    """
    spec = str(path)
    folder = spec.split(SERIES_SEP)[0]
    _quiet_monai_loggers()
    from monai.data import ITKReader, NibabelReader

    try:
        if SERIES_SEP in spec or Path(folder).is_dir():
            import itk

            files = _dicom_files(spec)
            reader = ITKReader()
            image = itk.imread([str(f) for f in files] if len(files) > 1 else str(files[0]))
            array, meta = reader.get_data(image)
        else:
            p = Path(spec)
            if not p.is_file():
                raise FileNotFoundError(f"input not found: {p}")
            suffix = volume_suffix(p.name)
            if suffix is None:
                raise VolumeError(f"{p}: unknown file type (read: {', '.join(READ_SUFFIXES)} files and DICOM series folders)")
            reader = NibabelReader() if suffix in NIFTI_SUFFIXES else ITKReader()
            array, meta = reader.get_data(reader.read(str(p)))
    except (VolumeError, FileNotFoundError):
        raise
    except Exception as err:  # nibabel/ITK/gzip/zlib/OSError: all mean "cannot read this file"
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise VolumeError(f"{spec}: not a readable {format_name(spec)} file ({reason[:200]})") from None
    array = np.asarray(array, dtype=np.float32)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{spec}: expected a 3-D volume, got shape {list(array.shape)} ({array.ndim}-D)")
    return array, np.asarray(meta["affine"], dtype=np.float64)


def nifti_header(path: str | Path):
    """A NIfTI file's header (its qform/sform codes carry over to a NIfTI output); ``None`` for other formats."""
    if volume_suffix(path) not in NIFTI_SUFFIXES or SERIES_SEP in str(path):
        return None
    import nibabel as nib

    return nib.load(str(path)).header


def output_suffix(path: str | Path) -> str:
    """The format an output path asks for; refuses what cannot be written."""
    suffix = next((s for s in WRITE_SUFFIXES if str(path).lower().endswith(s)), None)
    if suffix is None:
        raise VolumeError(f"{path}: unknown output type (write: {', '.join(WRITE_SUFFIXES)})")
    return suffix


def write_volume(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    header=None,
) -> Path:
    """Write ``array`` (X, Y, Z) with ``affine`` (RAS) in the format of ``path``'s extension.

    ``dtype``: float32, int16 (rounded, clipped to the int16 range) or uint8 (masks: 0/1). ``header``: a
    NIfTI input's header, so its qform/sform codes carry over to a NIfTI output. Never replaces an
    existing file unless ``overwrite``.
    """
    path = Path(path)
    suffix = output_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output exists: {path} (pass overwrite=true to replace it)")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    if suffix in NIFTI_SUFFIXES:
        return _write_nifti(array, affine, path, dtype=dtype, header=header)
    np_dtype = OUTPUT_DTYPES[dtype]
    _quiet_monai_loggers()
    from monai.data import ITKWriter

    writer = ITKWriter(output_dtype=np_dtype)
    writer.set_data_array(np.ascontiguousarray(_cast(array, dtype)), channel_dim=None)
    affine = np.asarray(affine, dtype=np.float64)
    writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write(str(path), compression=True)
    return path


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 as is; int16 rounded and clipped to its range; uint8 for masks (booleans become 0/1)."""
    np_dtype = OUTPUT_DTYPES[dtype]
    arr = np.asarray(array)
    if arr.dtype == np.bool_:  # masks: rint/clip below do not take booleans
        arr = arr.astype(np.uint8)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return arr.astype(np_dtype)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: str, header=None) -> Path:
    """NIfTI with exactly ``affine``; ``header`` (the input's) carries its qform/sform codes and units over;
    intensity scaling is reset."""
    import nibabel as nib

    np_dtype = OUTPUT_DTYPES[dtype]
    arr = _cast(array, dtype)
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
