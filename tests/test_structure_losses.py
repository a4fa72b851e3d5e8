"""MIND structure loss and the paired (supervised) term: the maths, in isolation and inside the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mr2ct.data.phantom import make_phantom
from mr2ct.losses import CycleLoss, MINDLoss, PairedLoss, mind_ssc
from mr2ct.losses.mind import SSC_PAIRS, _gaussian_blur


@pytest.fixture(scope="module")
def mri() -> torch.Tensor:
    """A real structure to describe: a phantom MRI, (1, 1, 24, 24, 32) scaled to [-1, 1]."""
    vol = torch.from_numpy(make_phantom((24, 24, 32), (6.0, 6.0, 6.0), seed=3).mri)[None, None]
    return vol / vol.max() * 2 - 1


def test_ssc_pairs_are_the_twelve_sqrt2_pairs():
    assert len(SSC_PAIRS) == 12
    for p, q in SSC_PAIRS:
        assert sum((a - b) ** 2 for a, b in zip(p, q)) == 2


def test_descriptor_shape_range_and_max_one(mri):
    d = mind_ssc(mri, sigma=1.0)
    assert d.shape == (1, 12, 24, 24, 32)
    assert d.min() > 0 and d.max() <= 1 + 1e-6
    assert torch.allclose(d.amax(dim=1), torch.ones(1, 24, 24, 32))  # normalised by the maximum over pairs


def test_mind_of_an_intensity_remapped_copy_is_near_zero_and_of_a_shifted_copy_is_not(mri):
    loss = MINDLoss(weight=5.0, sigma=1.0)
    linear = loss(mri, -0.7 * mri + 0.2)  # any linear remap, even an inverted contrast
    monotone = loss(mri, torch.tanh(mri))  # a non-linear but monotone remap: structure kept
    shifted = loss(mri, torch.roll(mri, shifts=2, dims=2))  # anatomy moved by 2 voxels
    noise = loss(mri, torch.rand_like(mri) * 2 - 1)
    assert linear < 1e-5
    assert monotone < 0.3 * shifted
    assert shifted > 0.1 and noise > shifted


def test_mind_loss_masked_and_differentiable(mri):
    loss = MINDLoss(sigma=1.0)
    fake = torch.roll(mri, 1, 3).requires_grad_(True)
    mask = torch.zeros_like(mri)
    mask[..., 8:16, 8:16, 8:24] = 1
    inside = loss(mri, fake, mask)
    inside.backward()
    assert torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    # the masked mean is the mean over the mask's voxels only
    full = (mind_ssc(fake.detach(), 1.0) - mind_ssc(mri, 1.0)).abs()
    assert torch.allclose(inside, full[:, :, 8:16, 8:16, 8:24].mean(), atol=1e-6)


def _blur_reference(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The descriptor's blur written as the definition reads: a 3D Gaussian (2 sigma) over the replicate-padded volume."""
    r = int(np.ceil(2 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (g[:, None, None] * g[None, :, None] * g[None, None, :]) / g.sum() ** 3
    n, c = x.shape[:2]
    padded = F.pad(x.double().reshape(n * c, 1, *x.shape[2:]), [r] * 6, mode="replicate")
    return F.conv3d(padded, kernel[None, None]).reshape(x.shape).float()


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_descriptor_blur_is_the_replicate_padded_gaussian(sigma):
    x = torch.randn(2, 3, 9, 12, 14)
    assert torch.allclose(_gaussian_blur(x, sigma), _blur_reference(x, sigma), atol=1e-5)


def test_descriptor_is_computed_in_fp32_under_autocast(mri):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = mind_ssc(mri, sigma=2.0)
    assert d.dtype == torch.float32 and torch.allclose(d, mind_ssc(mri, sigma=2.0), atol=1e-6)


def test_mind_of_a_constant_volume_is_finite():
    flat = torch.zeros(1, 1, 8, 8, 8)
    assert torch.isfinite(mind_ssc(flat)).all()
    assert torch.isfinite(MINDLoss()(flat, torch.rand_like(flat)))


def test_paired_term_is_zero_for_a_perfect_translation_and_l1_in_the_body():
    ct = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    term = PairedLoss(weight=10.0)
    assert term(ct.clone(), ct) == 0
    off = ct + 0.5
    body = torch.zeros_like(ct)
    body[:, :, 2:6] = 1
    off[:, :, :2] += 10.0  # errors outside the body do not count
    assert torch.isclose(term(off, ct, body), torch.tensor(0.5))


def test_bone_weighted_paired_term_counts_bone_errors_more_and_only_towards_ct():
    ct = torch.full((1, 1, 4, 4, 4), -0.8)
    ct[..., :2] = 0.5  # bone: above the level 0.0
    term = PairedLoss(weight=1.0, bone_weight=4.0)
    assert term(ct.clone(), ct, None, 0.0) == 0
    on_bone, on_soft = ct.clone(), ct.clone()
    on_bone[..., :1] += 0.5  # the same error on 16 bone voxels ...
    on_soft[..., 3:] += 0.5  # ... and on 16 soft-tissue voxels
    # weights: 32 bone voxels x 5 + 32 others x 1 = 192
    assert torch.isclose(term(on_bone, ct, None, 0.0), torch.tensor(0.5 * 16 * 5 / 192))
    assert torch.isclose(term(on_soft, ct, None, 0.0), torch.tensor(0.5 * 16 / 192))
    # no level (the reverse direction, an MRI target) or no bone weight: plain L1
    assert torch.isclose(term(on_bone, ct), torch.tensor(0.5 * 16 / 64))
    assert torch.isclose(PairedLoss(weight=1.0)(on_bone, ct, None, 0.0), torch.tensor(0.5 * 16 / 64))
    body = torch.zeros_like(ct)
    body[..., 1:] = 1  # 16 bone voxels x 5 + 32 others = 112 in the body; the errors on the rest do not count
    assert term(on_bone, ct, body, 0.0) == 0
    assert torch.isclose(term(on_soft, ct, body, 0.0), torch.tensor(0.5 * 16 / 112))


def test_model_weighs_bone_at_the_configured_hu_in_the_ct_direction_only():
    torch.manual_seed(0)
    model = _model({"paired": PairedLoss(weight=10.0, reverse=True, bone_weight=4.0, bone_hu=200.0)})
    a, b = torch.rand(2, 1, 16, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16, 16) * 2 - 1
    body = torch.ones(2, 1, 16, 16, 16)
    batch = {"paired": torch.tensor([True, True]), "mask_a": body, "mask_b": body}
    terms, fake_a, fake_b = model.generator_losses(a, b, "ab", batch)
    level = (200.0 + 1024.0) / 4024.0 * 2 - 1  # 200 HU on the default CT scale, -1024..3000 HU
    w = 1 + 4.0 * (b > level).float()
    assert torch.isclose(terms["paired_ab"], 10.0 * ((fake_b - b).abs() * w).sum() / w.sum(), atol=1e-6)
    assert torch.isclose(terms["paired_ba"], 10.0 * F.l1_loss(fake_a, a), atol=1e-6)


def test_masked_cycle_ignores_air():
    real = torch.zeros(1, 1, 4, 4, 4)
    rec = real.clone()
    rec[..., :2] = 1.0
    body = torch.zeros_like(real)
    body[..., 2:] = 1
    assert CycleLoss()(real, rec) == 0.5 and CycleLoss()(real, rec, body) == 0


def _model(losses: dict):
    from functools import partial

    from mr2ct.losses import AdversarialLoss
    from mr2ct.model import CycleGAN
    from mr2ct.nets import PatchDiscriminator3D, UNetGenerator

    gen = partial(UNetGenerator, channels=(4, 8, 16), strides=(2, 2))
    disc = partial(PatchDiscriminator3D, ndf=4, n_layers=2)
    return CycleGAN(gen, disc, {"adversarial": AdversarialLoss(), "cycle": CycleLoss(), **losses}, pool_size=0)


def test_model_applies_mind_both_ways_and_paired_only_to_pairs():
    torch.manual_seed(0)
    model = _model({"mind": MINDLoss(weight=5.0, sigma=1.0), "paired": PairedLoss(weight=10.0, reverse=True)})
    a, b = torch.rand(2, 1, 16, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16, 16) * 2 - 1
    body = torch.ones(2, 1, 16, 16, 16)
    unpaired = {"paired": torch.tensor([False, False]), "mask_a": body, "mask_b": body}
    terms, fake_a, fake_b = model.generator_losses(a, b, "ab", unpaired)
    assert {"mind_ab", "mind_ba", "paired_ab", "paired_ba"} <= set(terms)
    assert terms["paired_ab"] == 0 and terms["paired_ba"] == 0  # no pair in the batch: no supervision
    assert torch.isclose(terms["mind_ab"], 5.0 * MINDLoss(sigma=1.0)(a, fake_b), atol=1e-6)
    one_pair = {**unpaired, "paired": torch.tensor([False, True])}
    terms, fake_a, fake_b = model.generator_losses(a, b, "ab", one_pair)
    assert torch.isclose(terms["paired_ab"], 10.0 * F.l1_loss(fake_b[1:], b[1:]), atol=1e-6)
    assert torch.isclose(terms["paired_ba"], 10.0 * F.l1_loss(fake_a[1:], a[1:]), atol=1e-6)
    # split halves: the A->B supervision belongs to the A half, the reverse to the B half
    assert set(model.generator_losses(a, b, "a", one_pair)[0]) == {"adv_ab", "cycle_a", "mind_ab", "paired_ab"}
    assert set(model.generator_losses(a, b, "b", one_pair)[0]) == {"adv_ba", "cycle_b", "mind_ba", "paired_ba"}


def test_paired_only_preset_trains_on_registered_nifti_pairs(train_cfg, tmp_path):
    """experiment=paired_only: the pairs folders alone feed training, and the paired term is logged."""
    from conftest import tiny
    from mr2ct.data.augment import write_phantom_nifti
    from mr2ct.train import train

    for modality in ("mri", "ct"):  # the same seeds rendered as MRI and CT: registered pairs
        write_phantom_nifti(tmp_path / "pairs" / modality, [1, 2], modality, (24, 24, 32), (6.0, 6.0, 6.0))
        write_phantom_nifti(tmp_path / "val" / modality, [9], modality, (24, 24, 32), (6.0, 6.0, 6.0))
    overrides = [o for o in tiny() if not o.startswith(("data.shape", "data.spacing", "data.n_"))]
    cfg = train_cfg(["experiment=paired_only", *overrides, "data.num_workers=0", "model.n_epochs=1", "model.n_epochs_decay=0",
                     f"data.train_pairs_a={tmp_path / 'pairs' / 'mri'}", f"data.train_pairs_b={tmp_path / 'pairs' / 'ct'}",
                     f"data.val_a={tmp_path / 'val' / 'mri'}", f"data.val_b={tmp_path / 'val' / 'ct'}"])
    metrics = train(cfg)
    assert metrics["train/g_paired_ab"] > 0 and metrics["train/g_paired_ba"] > 0 and np.isfinite(metrics["val/mae"])
