"""Metrics against hand-computed cases; the mode-collapse detector both ways."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from mr2ct.data import PhantomDataModule
from mr2ct.evaluation.collapse import collapse_diagnostics, collapse_warnings, split_for_collapse, thumbnail
from mr2ct.evaluation.metrics import case_metrics, dice, mae_hu, psnr_hu, ssim_hu, ssim_map


def test_mae_inside_mask_by_hand():
    ref = torch.zeros(4, 4, 4)
    pred = torch.zeros(4, 4, 4)
    pred[0] = 100.0  # 16 voxels off by 100
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:2] = True  # 32 voxels, half of them wrong
    assert float(mae_hu(pred, ref, mask)) == pytest.approx(50.0)
    assert float(mae_hu(pred, ref, torch.zeros_like(mask))) == pytest.approx(25.0)  # empty mask: all voxels


def test_psnr_clips_to_synthrad_range_and_uses_masked_voxels():
    ref = torch.zeros(5, 5, 5)
    pred = torch.full((5, 5, 5), 100.0)
    mask = torch.ones(5, 5, 5, dtype=torch.bool)
    assert float(psnr_hu(pred, ref, mask)) == pytest.approx(20 * math.log10(4024 / 100), abs=1e-4)
    # outside the mask errors do not count; above 3000 HU both are clipped
    pred[0] = 5000.0
    ref[0] = 3500.0
    mask[1] = False
    # 100 masked voxels: rows 2-4 (75) off by 100, row 0 (25) clipped to 3000 on both sides
    mse = 75 * 100.0**2 / 100
    assert float(psnr_hu(pred, ref, mask)) == pytest.approx(10 * math.log10(4024**2 / mse), abs=1e-4)


def test_ssim_of_constant_volumes_by_hand():
    # no variance: SSIM = luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) after the +1024 shift
    a, b = 0.0, 400.0
    mx, my, c1 = a + 1024, b + 1024, (0.01 * 4024) ** 2
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    got = ssim_hu(torch.full((9, 9, 9), b), torch.full((9, 9, 9), a), torch.ones(9, 9, 9, dtype=torch.bool))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_ssim_masking_sets_outside_to_minus_1024_and_averages_inside():
    torch.manual_seed(0)
    ref = torch.rand(12, 12, 12) * 1000
    pred = ref + torch.randn(12, 12, 12) * 50
    mask = torch.zeros(12, 12, 12, dtype=torch.bool)
    mask[3:9, 3:9, 3:9] = True
    # what lies outside the mask does not matter
    pred_out = pred.clone()
    pred_out[~mask] = 2500.0
    assert float(ssim_hu(pred, ref, mask)) == pytest.approx(float(ssim_hu(pred_out, ref, mask)), abs=1e-6)
    smap = ssim_map(torch.where(mask, pred, -1024.0) + 1024, torch.where(mask, ref, -1024.0) + 1024, 4024.0)
    assert float(ssim_hu(pred, ref, mask)) == pytest.approx(float(smap[mask[3:-3, 3:-3, 3:-3]].mean()), abs=1e-6)
    assert float(ssim_hu(ref, ref, mask)) == pytest.approx(1.0, abs=1e-6)


def test_ssim_map_matches_torchmetrics_without_sample_covariance():
    torch.manual_seed(1)
    x, y = torch.rand(14, 13, 12), torch.rand(14, 13, 12)
    _, full = structural_similarity_index_measure(
        x[None, None].double(), y[None, None].double(), gaussian_kernel=False, kernel_size=7, data_range=1.0, return_full_image=True
    )
    ours = ssim_map(x, y, data_range=1.0, sample_covariance=False)
    assert torch.allclose(ours, full[0, 0, 3:-3, 3:-3, 3:-3].float(), atol=1e-5)
    # scikit-image (SynthRAD) uses the N-1 variances: a small, systematic difference
    assert not torch.allclose(ssim_map(x, y, 1.0), ours, atol=1e-6)


def test_dice_by_hand():
    a = torch.zeros(10, dtype=torch.bool)
    b = torch.zeros(10, dtype=torch.bool)
    a[:4] = True
    b[2:8] = True  # overlap 2, sizes 4 and 6
    assert float(dice(a, b)) == pytest.approx(2 * 2 / 10)
    assert float(dice(torch.zeros(3), torch.zeros(3))) == 1.0


@pytest.fixture(scope="module")
def phantom_pairs():
    dm = PhantomDataModule(n_test=4, shape=[24, 24, 32], spacing=[6.0, 6.0, 6.0], patch_size=[16, 16, 16])
    dm.setup("test")
    batches = list(dm.test_dataloader())
    return [b["a"][0, 0].as_tensor() for b in batches], [b["b"][0, 0].as_tensor() for b in batches], batches


def test_collapse_detector_flags_identical_outputs(phantom_pairs):
    mri, ct, _ = phantom_pairs
    diag = collapse_diagnostics(mri, [ct[0]] * 4)
    assert diag["diversity"] == 0.0
    assert diag["identifiability"] == pytest.approx(0.25)  # chance
    assert len(collapse_warnings(diag)) == 2


def test_collapse_detector_passes_an_anatomy_preserving_translation(phantom_pairs):
    mri, ct, _ = phantom_pairs
    diag = collapse_diagnostics(mri, ct)  # the real CT of each MRI: a perfect translation
    assert diag["identifiability"] == 1.0 and diag["diversity"] > 0.1
    assert collapse_warnings(diag) == []
    # the same outputs, wrongly paired: diverse, but no output keeps its input's anatomy
    shuffled = collapse_diagnostics(mri, ct[1:] + ct[:1])
    assert shuffled["identifiability"] == 0.0 and any("identifiability" in w for w in collapse_warnings(shuffled))


def test_collapse_helpers_small_sets_and_thumbnails():
    xs, ys = split_for_collapse([torch.rand(8, 8, 20)] * 2, [torch.rand(8, 8, 20)] * 2, min_n=4)
    assert len(xs) == len(ys) == 4 and xs[0].shape == (8, 8, 10)
    assert thumbnail(torch.rand(128, 64, 32), 64).shape == (64, 32, 16)
    with pytest.raises(ValueError, match="N >= 4"):
        collapse_diagnostics([torch.rand(4, 4, 4)] * 3, [torch.rand(4, 4, 4)] * 3)


def test_case_metrics_of_the_real_ct_is_perfect(phantom_pairs):
    _, _, batches = phantom_pairs
    b = batches[0]
    ct = (b["b"][0, 0].as_tensor() + 1) / 2 * 4024 - 1024
    m = case_metrics(ct, ct, b["bone"][0, 0].as_tensor() > 0.5, mri=b["a"][0, 0].as_tensor())
    assert m["mae"] == 0.0 and m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0)
    assert m["dice"] > 0.8  # thresholding the real CT finds the phantom's bone
    assert m["dice_mri"] < 0.3  # the same thresholding on the MRI does not (bone is dark in T2)


@pytest.mark.parametrize("collapsed", [True, False])
def test_collapse_monitor_logs_and_warns_only_on_collapse(phantom_pairs, collapsed):
    """The training callback: val/diversity and val/identifiability logged; console warnings only when collapsed."""
    import warnings
    from types import SimpleNamespace

    from mr2ct.training.callbacks import CollapseMonitor

    mri, ct, batches = phantom_pairs
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=7)
    monitor = CollapseMonitor()
    monitor.on_validation_epoch_start(trainer, module)
    for i, batch in enumerate(batches):
        fake = (ct[0] if collapsed else ct[i])[None, None]
        monitor.on_validation_batch_end(trainer, module, {"fake_b": fake}, batch, i)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_validation_epoch_end(trainer, module)
    messages = [str(w.message) for w in caught if "epoch 7" in str(w.message)]
    assert set(logged) == {"val/diversity", "val/identifiability"}
    if collapsed:
        assert logged["val/diversity"] == 0.0 and len(messages) == 2 and any("identifiability" in m for m in messages)
    else:
        assert logged["val/identifiability"] == 1.0 and messages == []
