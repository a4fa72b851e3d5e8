"""Intensity normalisation, patch sampling and the recipe's augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mr2ct.data.transforms import (
    BACKGROUND,
    RandGaussianRotated,
    RandRecipeNoised,
    hu_to_unit,
    normalize_ct,
    normalize_mri,
    patch_transforms,
    unit_to_hu,
)

WINDOW = (-1024.0, 3000.0)


def test_hu_round_trip_inside_window_and_clipping():
    hu = torch.tensor([-1024.0, -1000.0, 0.0, 1000.0, 3000.0])
    assert torch.allclose(unit_to_hu(hu_to_unit(hu, WINDOW), WINDOW), hu, atol=1e-3)
    assert hu_to_unit(torch.tensor([-2000.0, 5000.0]), WINDOW).tolist() == [-1.0, 1.0]
    assert np.allclose(unit_to_hu(np.array([-1.0, 1.0]), WINDOW), WINDOW)
    # the MONAI transform used on data computes the same mapping
    x = torch.linspace(-1500, 3500, 11)[None, None, None]
    assert torch.allclose(normalize_ct(["im"], WINDOW)({"im": x})["im"], hu_to_unit(x, WINDOW), atol=1e-6)


def test_mri_percentile_scaling_is_robust_to_outliers():
    x = torch.rand(1, 16, 16, 16) * 100
    x[0, 0, 0, 0] = 1e6  # one hot voxel must not squash everything else
    y = normalize_mri(["im"], (0.5, 99.5))({"im": x})["im"]
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0.4


def test_rotation_angles_follow_normal_with_given_std():
    rot = RandGaussianRotated(["im"], std_deg=10.0, prob=1.0)
    rot.set_random_state(0)
    angles = []
    for _ in range(400):
        rot.randomize()
        nonzero = [a for a in rot._angles if a != 0.0]
        assert len(nonzero) == 1  # one random axis per draw
        angles.append(nonzero[0])
    assert abs(np.std(angles) - math.radians(10)) < math.radians(1.2)
    assert abs(np.mean(angles)) < math.radians(1.5)


def test_rotation_changes_the_volume_and_keeps_shape():
    im = torch.zeros(1, 20, 20, 20)
    im[:, 5:15, 9:11, :] = 1.0
    out = RandGaussianRotated(["im"], std_deg=30.0, prob=1.0).set_random_state(1)({"im": im})["im"]
    assert out.shape == im.shape and not torch.allclose(torch.as_tensor(out), im)


def test_noise_recipe_mean_and_std_are_drawn_from_the_recipe():
    noise = RandRecipeNoised(["im"], prob=1.0)
    noise.set_random_state(0)
    seen_stds = set()
    for _ in range(30):
        out = noise({"im": torch.zeros(1, 24, 24, 24)})["im"]
        assert -0.1 - 0.02 <= float(out.mean()) <= 0.1 + 0.02
        std = float(out.std())
        match = min((0.01, 0.05, 0.1), key=lambda s: abs(s - std))
        assert abs(match - std) < 0.1 * match
        seen_stds.add(match)
    assert seen_stds == {0.01, 0.05, 0.1}


def test_patch_transforms_pad_small_volumes_with_background():
    xform = patch_transforms(["im"], (16, 16, 16), augment={})
    out = xform({"im": torch.zeros(1, 8, 20, 16)})["im"]
    assert out.shape == (1, 16, 16, 16) and type(out) is torch.Tensor
    assert float(out.min()) == BACKGROUND  # padded with air, not with 0 (mid-grey)


@pytest.mark.parametrize("k", [1, 3])
def test_patch_transforms_with_augmentation_and_several_samples(k):
    aug = {"rotation_std_deg": 10.0, "rotation_prob": 1.0, "noise_prob": 1.0}
    xform = patch_transforms(["im"], (16, 16, 16), augment=aug, samples_per_volume=k)
    xform.set_random_state(0)
    out = xform({"im": torch.rand(1, 32, 32, 32)})
    patches = out if isinstance(out, list) else [out]
    assert len(patches) == k and all(p["im"].shape == (1, 16, 16, 16) for p in patches)


def test_nearest_rotation_keeps_a_thin_shell_at_full_value():
    """Linear interpolation spreads a one-voxel plane of 1300 HU over two voxels at a lower value; nearest keeps every value."""
    vol = torch.full((1, 24, 24, 24), 50.0)
    vol[:, :, :, 11] = 1300.0  # a one-voxel "cortical" plane
    peaks = {}
    for mode in ("bilinear", "nearest"):
        rot = RandGaussianRotated(["im"], std_deg=10.0, prob=1.0, axes=(0,), mode=mode)
        rot.set_random_state(3)
        out = rot({"im": vol})["im"][0, 4:-4, 4:-4, 4:-4]  # inside the border padding
        assert rot._angles[0] != 0.0
        peaks[mode] = out.amax(dim=2)  # the plane's brightest voxel along each line that crosses it
        if mode == "nearest":
            assert set(out.unique().tolist()) <= {50.0, 1300.0}
    assert float(peaks["nearest"].min()) == 1300.0
    assert float(peaks["bilinear"].median()) < 1200.0


def test_patch_transforms_pass_the_rotation_mode():
    aug = {"rotation_std_deg": 10.0, "rotation_prob": 1.0, "rotation_mode": "nearest"}
    xform = patch_transforms(["im"], (16, 16, 16), augment=aug)
    xform.set_random_state(1)
    vol = torch.randint(0, 5, (1, 24, 24, 24)).float()
    out = xform({"im": vol})["im"]
    assert set(out.unique().tolist()) <= set(vol.unique().tolist())
    with pytest.raises(ValueError, match="rotation mode must be one of"):
        RandGaussianRotated(["im"], mode="bicubic")
