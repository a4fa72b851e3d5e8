"""Tests for the procedural synthetic spine phantom (mr2ct.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mr2ct.data.phantom import TISSUES, Phantom, make_anatomy, make_phantom, render_ct, render_mri

T = TISSUES
SHAPE = (32, 32, 32)
SPACING = (4.0, 4.0, 4.0)


def _median(vol: np.ndarray, labels: np.ndarray, name: str) -> float:
    mask = labels == T[name]
    assert mask.any(), f"tissue {name!r} is missing from the phantom"
    return float(np.median(vol[mask]))


def _canal_x_mm(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Lateral (X) position in mm of the spinal canal centre for every z-slice."""
    canal = (labels == T["csf"]) | (labels == T["cord"])
    nx = labels.shape[0]
    xs = (np.arange(nx) - (nx - 1) / 2.0) * spacing[0]
    out = []
    for z in range(labels.shape[2]):
        ix = np.nonzero(canal[:, :, z])[0]
        assert ix.size, f"no spinal canal in z-slice {z}"
        out.append(xs[ix].mean())
    return np.asarray(out)


def _disc_levels(labels: np.ndarray) -> int:
    """Number of separate runs of disc-dominated z-slices (~ number of visible discs)."""
    d = (labels == T["disc"]).sum(axis=(0, 1))
    on = (d > 0.3 * d.max()).astype(int)
    return int(np.sum(np.diff(np.r_[0, on]) == 1))


def _disc_period_mm(labels: np.ndarray, dz: float) -> float:
    """Median z distance (mm) between successive disc levels (vertebral period)."""
    d = (labels == T["disc"]).sum(axis=(0, 1)).astype(float)
    edges = np.diff(np.r_[0, (d > 0.3 * d.max()).astype(int), 0])
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    centres = [(d[a:b] * np.arange(a, b)).sum() / d[a:b].sum() for a, b in zip(starts, ends)]
    assert len(centres) >= 3, centres
    return float(np.median(np.diff(centres)) * dz)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [make_phantom(SHAPE, SPACING, seed=s) for s in range(3)]


# ------------------------------------------------------------------ API, shapes, dtypes


def test_tissue_table() -> None:
    assert len(set(T.values())) == len(T)
    assert T["air"] == 0
    for name in ("fat", "muscle", "skin", "cortical", "trabecular", "disc", "csf", "cord"):
        assert name in T


def test_shapes_and_dtypes() -> None:
    shape = (28, 24, 36)
    p = make_phantom(shape, (3.0, 3.5, 2.5), seed=4)
    assert isinstance(p, Phantom)
    assert p.spacing == (3.0, 3.5, 2.5)
    for arr, dt in ((p.ct, np.float32), (p.mri, np.float32), (p.bone, np.uint8), (p.labels, np.uint8)):
        assert arr.shape == shape
        assert arr.dtype == dt
    assert np.isfinite(p.ct).all() and np.isfinite(p.mri).all()
    assert p.mri.min() >= 0.0
    assert set(np.unique(p.labels).tolist()) <= set(T.values())
    assert set(np.unique(p.bone).tolist()) == {0, 1}
    expected_bone = (p.labels == T["cortical"]) | (p.labels == T["trabecular"])
    np.testing.assert_array_equal(p.bone, expected_bone.astype(np.uint8))
    with pytest.raises(Exception):
        p.ct = p.mri  # type: ignore[misc]  # frozen dataclass


def test_defaults_are_64_cubed_at_2mm() -> None:
    p = make_phantom()
    assert p.ct.shape == (64, 64, 64)
    assert p.spacing == (2.0, 2.0, 2.0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        make_phantom(SHAPE, SPACING, seed=-1)
    with pytest.raises(ValueError):
        make_anatomy((32, 32), (2.0, 2.0), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_anatomy(SHAPE, (2.0, 0.0, 2.0), 0)
    with pytest.raises(ValueError):
        render_ct(np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError):
        render_mri(np.full((8, 8, 8), 99, np.uint8), 0)


# ------------------------------------------------------------------------ determinism


def test_same_seed_is_bit_identical() -> None:
    a = make_phantom(SHAPE, SPACING, seed=7)
    b = make_phantom(SHAPE, SPACING, seed=7)
    for name in ("ct", "mri", "bone", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_components_match_make_phantom() -> None:
    p = make_phantom(SHAPE, SPACING, seed=3)
    labels = make_anatomy(SHAPE, SPACING, 3)
    np.testing.assert_array_equal(p.labels, labels)
    np.testing.assert_array_equal(p.ct, render_ct(labels, 3))
    np.testing.assert_array_equal(p.mri, render_mri(labels, 3))


def test_different_seeds_give_different_anatomy(phantoms: list[Phantom]) -> None:
    for i in range(len(phantoms)):
        for j in range(i + 1, len(phantoms)):
            frac = np.mean(phantoms[i].labels != phantoms[j].labels)
            assert frac > 0.01, (i, j, frac)
            assert not np.array_equal(phantoms[i].bone, phantoms[j].bone)


def test_anatomy_and_render_seeds_are_independent() -> None:
    base = make_phantom(SHAPE, SPACING, seed=0)
    rerender = make_phantom(SHAPE, SPACING, seed=0, render_seed=1)
    np.testing.assert_array_equal(base.labels, rerender.labels)  # same geometry
    np.testing.assert_array_equal(base.bone, rerender.bone)
    assert not np.array_equal(base.ct, rerender.ct)  # new intensities / noise
    assert not np.array_equal(base.mri, rerender.mri)
    reshape = make_phantom(SHAPE, SPACING, seed=0, anatomy_seed=1)
    assert not np.array_equal(base.labels, reshape.labels)
    np.testing.assert_array_equal(reshape.labels, make_anatomy(SHAPE, SPACING, 1))
    # render seed == seed == 0: the same look-up tables and noise stream
    np.testing.assert_array_equal(reshape.ct, render_ct(reshape.labels, 0))
    # seed only provides defaults
    explicit = make_phantom(SHAPE, SPACING, seed=5, anatomy_seed=0, render_seed=0)
    np.testing.assert_array_equal(explicit.ct, base.ct)


# ------------------------------------------------------------------------- intensities


def test_ct_hounsfield_ranges(phantoms: list[Phantom]) -> None:
    cort = []
    for p in phantoms:
        med = {name: _median(p.ct, p.labels, name) for name in T}
        assert -1020.0 < med["air"] < -980.0
        assert 1000.0 <= med["cortical"] <= 1500.0
        assert -150.0 < med["fat"] < 0.0 < med["muscle"] < 100.0
        assert med["muscle"] < med["trabecular"] < med["cortical"]
        assert 150.0 < med["trabecular"] < 700.0  # 200-400 HU, raised by partial volume
        assert -50.0 < med["csf"] < 200.0
        assert p.ct.min() > -1200.0 and p.ct.max() < 1700.0
        # noise: air is not perfectly flat, but mild (~10-20 HU)
        sd_air = float(np.std(p.ct[p.labels == T["air"]]))
        assert 5.0 < sd_air < 30.0
        cort.append(med["cortical"])
    assert len({round(c) for c in cort}) == len(cort)  # cortical HU drawn per sample


def test_ct_bone_threshold_separates_bone() -> None:
    p = make_phantom((48, 48, 48), (2.0, 2.0, 2.0), seed=11)
    soft = np.isin(p.labels, [T["fat"], T["muscle"], T["skin"], T["disc"], T["csf"], T["cord"]])
    assert np.percentile(p.ct[soft], 99.5) < 200.0
    assert np.median(p.ct[p.bone == 1]) > 400.0


def test_mri_contrast_ordering(phantoms: list[Phantom]) -> None:
    for p in phantoms:
        med = {name: _median(p.mri, p.labels, name) for name in T}
        assert med["csf"] > med["muscle"]
        assert med["fat"] > med["muscle"]
        assert med["disc"] > med["muscle"]
        assert med["cortical"] < med["muscle"]
        assert med["muscle"] < med["trabecular"] < med["csf"]
        assert med["air"] < 40.0 and med["cortical"] < 100.0
        assert p.mri.min() >= 0.0 and p.mri.max() < 2000.0


def test_mri_has_bias_field_and_rician_noise() -> None:
    labels = np.full((24, 24, 24), T["muscle"], np.uint8)
    img = render_mri(labels, 0)
    # smooth multiplicative bias: octant means differ by several percent
    octants = [img[i : i + 12, j : j + 12, k : k + 12].mean() for i in (0, 12) for j in (0, 12) for k in (0, 12)]
    assert max(octants) / min(octants) > 1.05
    # Rician noise floor in air: positive, no exact zeros
    air = render_mri(np.zeros((16, 16, 16), np.uint8), 0)
    assert air.min() > 0.0 and 3.0 < air.mean() < 40.0


# ---------------------------------------------------------------------------- anatomy


def test_bone_mask_inside_body_and_spans_z(phantoms: list[Phantom]) -> None:
    for p in phantoms:
        bone = p.bone.astype(bool)
        assert bone.sum() > 100
        # surrounded by soft tissue: a 1-voxel dilation never reaches air or skin
        grown = ndimage.binary_dilation(bone, structure=np.ones((3, 3, 3), bool))
        assert not np.isin(p.labels[grown], [T["air"], T["skin"]]).any()
        dist = ndimage.distance_transform_edt(p.labels > 0, sampling=p.spacing)
        assert dist[bone].min() > 3.0
        # spine spans the whole Z extent
        z_bone = bone.any(axis=(0, 1))
        z_spine = (bone | (p.labels == T["disc"])).any(axis=(0, 1))
        assert z_spine.all()
        assert z_bone.mean() > 0.7
        n = p.labels.shape[2] // 8
        assert z_bone[:n].any() and z_bone[-n:].any()
        # both bone classes exist, trabecular bone is enclosed by cortex
        assert (p.labels == T["cortical"]).any() and (p.labels == T["trabecular"]).any()
        trab_grown = ndimage.binary_dilation(p.labels == T["trabecular"])
        assert np.isin(p.labels[trab_grown], [T["cortical"], T["trabecular"]]).all()


def test_body_fills_fov_with_air_around(phantoms: list[Phantom]) -> None:
    for p in phantoms:
        body = p.labels > 0
        for z in range(0, p.labels.shape[2], 4):
            frac = body[:, :, z].mean()
            assert 0.45 < frac < 0.9, (z, frac)
        assert not body[[0, -1]].any() and not body[:, [0, -1]].any()
        # layered outline: skin at the border, fat under it, muscle inside
        centre = p.labels[p.labels.shape[0] // 2, :, p.labels.shape[2] // 2]
        inside = centre[centre > 0]
        assert inside[0] == T["skin"] and inside[-1] == T["skin"]
        assert T["fat"] in inside[:4].tolist() and T["muscle"] in inside.tolist()


def test_axis_convention_spine_along_z_posterior_elements_low_y(phantoms: list[Phantom]) -> None:
    for p in phantoms:
        lab = p.labels
        ys = np.arange(lab.shape[1])
        y_of = lambda m: float((m.sum(axis=(0, 2)) * ys).sum() / m.sum())  # noqa: E731
        canal = (lab == T["csf"]) | (lab == T["cord"])
        # canal present in every z-slice: the spine runs along the last axis
        assert canal.any(axis=(0, 1)).all()
        # discs / bodies are anterior (higher Y) of the canal
        assert y_of(lab == T["disc"]) > y_of(canal)
        # spine sits in the posterior half of the body
        body = lab > 0
        assert y_of(canal) < y_of(body)
        # posterior elements: there is bone behind (lower Y than) the canal
        y_canal_min = np.nonzero(canal.any(axis=(0, 2)))[0].min()
        assert p.bone[:, :y_canal_min, :].sum() > 10
        # transverse processes: bone is wider in X than the vertebral body in Y
        bx = np.nonzero(p.bone.any(axis=(1, 2)))[0]
        by = np.nonzero(p.bone.any(axis=(0, 2)))[0]
        assert np.ptp(bx) > 0.8 * np.ptp(by)


def test_axial_slice_has_body_arch_and_spinous_process() -> None:
    p = make_phantom((64, 64, 64), (2.0, 2.0, 2.0), seed=2)
    lab = p.labels
    # pick the slice with most trabecular bone (mid vertebral body)
    z = int(np.argmax((lab == T["trabecular"]).sum(axis=(0, 1))))
    sl = lab[:, :, z]
    canal = (sl == T["csf"]) | (sl == T["cord"])
    bone = (sl == T["cortical"]) | (sl == T["trabecular"])
    cx = int(round(np.nonzero(canal)[0].mean()))
    # walking along Y at the canal's X: bone (arch) behind and bone (body) in front of it
    column = bone[cx - 1 : cx + 2].any(axis=0)
    cy = np.nonzero(canal.any(axis=0))[0]
    assert column[: cy.min()].any(), "no arch / spinous process posterior to the canal"
    assert column[cy.max() + 1 :].any(), "no vertebral body anterior to the canal"
    # the canal is closed laterally (pedicles / arch on both sides)
    row = bone[:, int(round(cy.mean()))]
    assert row[: np.nonzero(canal.any(axis=1))[0].min()].any()
    assert row[np.nonzero(canal.any(axis=1))[0].max() + 1 :].any()


def test_sagittal_stack_of_vertebrae_and_discs() -> None:
    p = make_phantom((64, 64, 64), (2.0, 2.0, 2.0), seed=1)
    n_discs = _disc_levels(p.labels)
    # period 18-28 mm over 128 mm: 4-8 discs visible
    assert 4 <= n_discs <= 8, n_discs
    # vertebral bodies (trabecular cores) alternate with discs along z
    trab_z = (p.labels == T["trabecular"]).sum(axis=(0, 1))
    disc_z = (p.labels == T["disc"]).sum(axis=(0, 1))
    assert np.corrcoef(trab_z, disc_z)[0, 1] < -0.3


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((32, 32, 48), (3.0, 3.0, 3.0)), ((40, 32, 24), (2.5, 3.0, 4.0)), ((24, 24, 24), (4.0, 4.0, 4.0))],
)
def test_other_shapes_and_spacings(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    p = make_phantom(shape, spacing, seed=1)
    assert p.ct.shape == p.mri.shape == p.labels.shape == p.bone.shape == shape
    assert p.spacing == spacing
    bone = p.bone.astype(bool)
    assert (bone | (p.labels == T["disc"])).any(axis=(0, 1)).all()
    assert bone.any(axis=(0, 1)).mean() > 0.7
    assert not np.isin(p.labels[ndimage.binary_dilation(bone)], [T["air"]]).any()
    assert 1000.0 <= _median(p.ct, p.labels, "cortical") <= 1500.0


def test_anatomy_is_defined_in_millimetres() -> None:
    """Same field of view at two resolutions -> the same anatomy, rasterised differently."""
    fine = make_anatomy((64, 64, 64), (2.0, 2.0, 2.0), 6)
    coarse = make_anatomy((32, 32, 32), (4.0, 4.0, 4.0), 6)
    x_fine = _canal_x_mm(fine, (2.0, 2.0, 2.0))
    x_coarse = _canal_x_mm(coarse, (4.0, 4.0, 4.0))
    # fine z-slices 2k and 2k+1 straddle coarse slice k
    x_fine_pooled = 0.5 * (x_fine[0::2] + x_fine[1::2])
    assert np.abs(x_fine_pooled - x_coarse).max() < 4.0
    # volume fractions of bone and body agree
    for labs in (lambda a: (a == T["cortical"]) | (a == T["trabecular"]), lambda a: a > 0):
        f, c = labs(fine).mean(), labs(coarse).mean()
        assert abs(f - c) / f < 0.35, (f, c)
    assert abs(_disc_levels(fine) - _disc_levels(coarse)) <= 1


def test_anatomy_varies_with_seed() -> None:
    seeds = range(8)
    labels = [make_anatomy(SHAPE, SPACING, s) for s in seeds]
    curvature = [float(np.ptp(_canal_x_mm(lab, SPACING))) for lab in labels]
    discs = [_disc_levels(lab) for lab in labels]
    # scoliotic curvature: some nearly straight spines, some clearly bent
    assert min(curvature) < 5.0 and max(curvature) > 10.0, curvature
    # vertebra count / height differs between seeds (period = body height + disc)
    assert len(set(discs)) >= 2, discs
    periods = [_disc_period_mm(lab, SPACING[2]) for lab in labels]
    assert all(14.0 < q < 32.0 for q in periods), periods
    assert max(periods) - min(periods) > 4.0, periods
    # vertebral body size differs
    trab = [int((lab == T["trabecular"]).sum()) for lab in labels]
    assert len(set(trab)) == len(trab)


def test_speed_64_cubed() -> None:
    import time

    make_phantom(seed=0)  # warm-up
    t0 = time.perf_counter()
    make_phantom(seed=1)
    assert time.perf_counter() - t0 < 1.0


def test_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    import mr2ct.data.phantom as mod

    # Load the file on its own (package __init__ files may legitimately import torch).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('phantom_alone', {mod.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['phantom_alone'] = m\n"
        "spec.loader.exec_module(m)\n"
        "m.make_phantom((16, 16, 16), (8.0, 8.0, 8.0), 0)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
