"""Every format gives the same array and world coordinates; bad files are refused with one line naming them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mr2ct.formats import SERIES_SEP, VolumeError, list_volumes, read_volume, volume_stem, write_volume

#: an oblique-free but permuted, flipped, shifted grid: axis order and signs must survive every format
AFFINE = np.array([[0.0, -2.0, 0.0, 40.0], [1.5, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 12.0], [0.0, 0.0, 0.0, 1.0]])


def volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """Integer-valued HU-like volume: exact in int16 DICOM pixels and in float files."""
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.float32)


def write_dicom_series(folder: Path, vol: np.ndarray, affine: np.ndarray, series_uid: str | None = None, skip: int | None = None,
                       shift_slice: int | None = None) -> str:
    """CT slices (X, Y) of ``vol`` (X, Y, Z) with the geometry tags of ``affine`` (RAS), as a scanner writes them."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    assert np.abs(vol).max() < 2**15 and np.array_equal(vol, np.rint(vol)), "DICOM pixels here are int16"
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's patient coordinates are LPS
    col_dir, row_dir = lps[:3, 0], lps[:3, 1]  # i runs along a row (columns index), j down the columns
    dx, dy = np.linalg.norm(col_dir), np.linalg.norm(row_dir)
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    for k in range(vol.shape[2]):
        if k == skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"IM{vol.shape[2] - k:04d}"  # no extension, numbered against the slice order: as scanners do
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        pos = lps[:3, :3] @ np.array([0.0, 0.0, k + (0.4 if k == shift_slice else 0.0)]) + lps[:3, 3]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*(col_dir / dx), *(row_dir / dy))]
        ds.PixelSpacing = [float(dy), float(dx)]  # row spacing, column spacing
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


def test_every_format_gives_the_same_array_and_world_coordinates(tmp_path):
    vol = volume()
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "v.nii.gz")
    for ext in (".mha", ".nrrd", ".nii"):
        write_volume(vol, AFFINE, tmp_path / f"v{ext}")
    write_dicom_series(tmp_path / "dicom", vol, AFFINE)
    paths = list_volumes(tmp_path)
    assert sorted(Path(p).name for p in paths) == ["dicom", "v.mha", "v.nii", "v.nii.gz", "v.nrrd"]
    for p in paths:
        array, affine = read_volume(p)
        np.testing.assert_array_equal(array, vol, err_msg=p)
        np.testing.assert_allclose(affine, AFFINE, atol=1e-4, err_msg=p)
        assert volume_stem(p) in ("v", "dicom")


def test_folder_of_several_series_is_split_by_series_uid(tmp_path):
    uid1 = write_dicom_series(tmp_path / "study", volume(seed=1), AFFINE, series_uid="1.2.3.1")
    shifted = AFFINE.copy()
    shifted[:3, 3] += 500.0  # same files' names would collide: a second series written beside the first
    for p in (tmp_path / "study").iterdir():
        p.rename(p.with_name("a_" + p.name))
    uid2 = write_dicom_series(tmp_path / "study", volume(seed=2), shifted, series_uid="1.2.3.2")
    names = [str(p) for p in list_volumes(tmp_path)]
    assert names == [f"{tmp_path / 'study'}{SERIES_SEP}{uid1}", f"{tmp_path / 'study'}{SERIES_SEP}{uid2}"]
    np.testing.assert_array_equal(read_volume(names[1])[0], volume(seed=2))
    with pytest.raises(VolumeError, match="holds 2 DICOM series where one volume is expected"):
        read_volume(tmp_path / "study")
    assert volume_stem(names[0]) == "study_1.2.3.1"


@pytest.mark.parametrize("damage, message", [("skip", "missing slice"), ("shift", "uneven slice spacing")])
def test_dicom_series_with_a_gap_is_refused(tmp_path, damage, message):
    kwargs = {"skip": 4} if damage == "skip" else {"shift_slice": 4}
    write_dicom_series(tmp_path / "s", volume(), AFFINE, **kwargs)
    with pytest.raises(VolumeError, match=message) as err:
        read_volume(tmp_path / "s")
    assert "\n" not in str(err.value) and str(tmp_path / "s") in str(err.value)


def test_bad_files_are_refused_naming_them(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), tmp_path / "series4d.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    write_volume(volume(), AFFINE, tmp_path / "orphan.mha")
    header = tmp_path / "detached.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = gone.raw\n")
    cases = {"flat.nii.gz": r"expected a 3-D volume, got shape \[8, 8\] \(2-D\)",
             "series4d.nii.gz": r"got shape \[8, 8, 8, 2\] \(4-D\)", "notes.txt": "unknown file type",
             "detached.mhd": "not a readable MetaImage file"}
    for name, message in cases.items():
        with pytest.raises(VolumeError, match=message) as err:
            read_volume(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)
    with pytest.raises(VolumeError, match="unknown output type"):
        write_volume(volume(), AFFINE, tmp_path / "out.png")


def test_write_never_replaces_without_overwrite(tmp_path):
    write_volume(volume(), AFFINE, tmp_path / "v.mha")
    before = (tmp_path / "v.mha").read_bytes()
    with pytest.raises(FileExistsError):
        write_volume(volume(seed=3), AFFINE, tmp_path / "v.mha")
    assert (tmp_path / "v.mha").read_bytes() == before
    write_volume(volume(seed=3), AFFINE, tmp_path / "v.mha", dtype="int16", overwrite=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "v.mha")[0], volume(seed=3))
