"""Unit tests for the CycleGAN loss terms in mr2ct.losses (math checked by hand)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mr2ct.losses import (
    AdversarialLoss,
    CycleLoss,
    GradientConsistencyLoss,
    IdentityLoss,
    PerceptualLoss,
    central_differences,
    gradient_correlation,
)
from mr2ct.nets.vgg import VGG16_LAYERS, VGG16Features


def _vol(b=1, c=1, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, s, s, s, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- adversarial
def test_lsgan_hand_values():
    loss = AdversarialLoss()
    assert loss.weight == 1.0 and loss.mode == "lsgan"
    p = torch.full((2, 1, 4, 4, 4), 0.5)
    assert loss(p, True).item() == pytest.approx(0.25)
    assert loss(p, False).item() == pytest.approx(0.25)
    assert loss(torch.ones(1, 1, 2, 2, 2), True).item() == pytest.approx(0.0)
    assert loss(torch.ones(1, 1, 2, 2, 2), False).item() == pytest.approx(1.0)
    assert loss(torch.zeros(1, 1, 2, 2, 2), True).item() == pytest.approx(1.0)
    # mixed values: mean((x-1)^2) for x in {0, 2, 3, -1} = (1 + 1 + 4 + 4)/4 = 2.5
    x = torch.tensor([0.0, 2.0, 3.0, -1.0]).view(1, 1, 4, 1, 1)
    assert loss(x, True).item() == pytest.approx(2.5)
    assert loss(x, False).item() == pytest.approx((0 + 4 + 9 + 1) / 4)


def test_discriminator_loss_is_halved():
    loss = AdversarialLoss(weight=3.0)
    assert loss.weight == 3.0
    real = torch.full((1, 1, 2, 2, 2), 0.0)  # (0-1)^2 = 1
    fake = torch.full((1, 1, 2, 2, 2), 1.0)  # 1^2 = 1
    assert loss.discriminator_loss(real, fake).item() == pytest.approx(1.0)  # 0.5 * (1 + 1), unweighted
    real = torch.full((1, 1, 2, 2, 2), 1.0)
    fake = torch.full((1, 1, 2, 2, 2), 0.5)
    assert loss.discriminator_loss(real, fake).item() == pytest.approx(0.125)


def test_list_input_uses_last():
    loss = AdversarialLoss()
    feats = [torch.full((1, 4, 4, 4, 4), 100.0), torch.full((1, 8, 2, 2, 2), -7.0), torch.full((1, 1, 2, 2, 2), 0.5)]
    assert loss(feats, True).item() == pytest.approx(0.25)
    assert loss(tuple(feats), False).item() == pytest.approx(0.25)
    with pytest.raises(TypeError):
        loss([], True)


def test_vanilla_matches_bce():
    loss = AdversarialLoss(mode="vanilla")
    p = torch.randn(2, 1, 3, 3, 3)
    assert torch.allclose(loss(p, True), F.binary_cross_entropy_with_logits(p, torch.ones_like(p)))
    assert torch.allclose(loss(p, False), F.binary_cross_entropy_with_logits(p, torch.zeros_like(p)))
    # logits 0 -> log(2) for both targets
    z = torch.zeros(1, 1, 2, 2, 2)
    assert loss(z, True).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert loss([p, z], False).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    with pytest.raises(ValueError):
        AdversarialLoss(mode="wgan")


# ----------------------------------------------------------------------------- cycle / identity
def test_cycle_and_identity_hand_l1():
    cyc, idt = CycleLoss(), IdentityLoss()
    assert cyc.weight == 10.0 and idt.weight == 0.5
    a = torch.zeros(1, 1, 2, 2, 2)
    b = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.0, 0.0, 2.0, -0.5]).view(1, 1, 2, 2, 2)
    expected = (0 + 1 + 1 + 0.5 + 0 + 0 + 2 + 0.5) / 8
    assert cyc(a, b).item() == pytest.approx(expected)
    assert idt(a, b).item() == pytest.approx(expected)
    x = _vol(2, 1, 8, seed=1)
    y = _vol(2, 1, 8, seed=2)
    assert torch.allclose(cyc(x, y), (x - y).abs().mean())
    assert cyc(x, x).item() == 0.0
    with pytest.raises(ValueError):
        cyc(x, y[:, :, :4])


# ----------------------------------------------------------------------------- gradient consistency
def test_central_differences_linear_ramp():
    s = 8
    i, j, k = torch.meshgrid(torch.arange(s), torch.arange(s), torch.arange(s), indexing="ij")
    vol = (2.0 * i - 3.0 * j + 0.5 * k).float().view(1, 1, s, s, s)
    gx, gy, gz = central_differences(vol)
    for g, val in zip((gx, gy, gz), (2.0, -3.0, 0.5)):
        assert g.shape == (1, 1, s - 2, s - 2, s - 2)
        assert torch.allclose(g, torch.full_like(g, val))
    # quadratic along x: d/dx (x^2) at interior x = 2x exactly for central differences
    q = (i.float() ** 2).view(1, 1, s, s, s)
    gx, _, _ = central_differences(q)
    assert torch.allclose(gx[0, 0, :, 0, 0], 2.0 * torch.arange(1, s - 1).float())


def test_gc_identical_is_zero():
    gc = GradientConsistencyLoss()
    assert gc.weight == 1.0
    a = _vol(2, 1, 12, seed=3)
    assert gc(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_gc_affine_intensity_is_zero():
    a = _vol(1, 1, 12, seed=4)
    assert GradientConsistencyLoss()(a, 2 * a + 3).item() == pytest.approx(0.0, abs=1e-6)


def test_gc_negated_is_two():
    a = _vol(1, 1, 12, seed=5)
    assert GradientConsistencyLoss()(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert gradient_correlation(a, -a).item() == pytest.approx(-1.0, abs=1e-6)


def test_gc_independent_noise_about_one():
    a = _vol(1, 1, 24, seed=6)
    b = _vol(1, 1, 24, seed=7)
    assert GradientConsistencyLoss()(a, b).item() == pytest.approx(1.0, abs=0.05)


def test_gc_is_per_sample():
    a = _vol(2, 1, 10, seed=8)
    b = torch.stack([a[0], -a[1]])
    gc = gradient_correlation(a, b)
    assert gc.shape == (2,)
    assert torch.allclose(gc, torch.tensor([1.0, -1.0]), atol=1e-6)
    assert GradientConsistencyLoss()(a, b).item() == pytest.approx(1.0, abs=1e-6)
    # scaling one sample must not change anything (NCC per sample, not over the batch)
    b2 = torch.stack([a[0] * 100.0, -a[1] * 0.01])
    assert torch.allclose(gradient_correlation(a, b2), torch.tensor([1.0, -1.0]), atol=1e-5)


def test_gc_constant_volume_no_nan():
    a = _vol(1, 1, 8, seed=9)
    c = torch.full_like(a, 0.3, requires_grad=True)
    loss = GradientConsistencyLoss()(a, c)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(c.grad).all()
    both = GradientConsistencyLoss()(torch.zeros_like(a), torch.zeros_like(a))
    assert both.item() == pytest.approx(1.0)


def test_gc_minimising_increases_correlation():
    torch.manual_seed(0)
    a = _vol(1, 1, 10, seed=10)
    b = _vol(1, 1, 10, seed=11).requires_grad_(True)
    gc_loss = GradientConsistencyLoss()
    before = gradient_correlation(a, b.detach()).item()
    opt = torch.optim.Adam([b], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        gc_loss(a, b).backward()
        opt.step()
    after = gradient_correlation(a, b.detach()).item()
    assert after > before + 0.3, (before, after)


# ----------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize(
    "loss",
    [CycleLoss(), IdentityLoss(), GradientConsistencyLoss()],
    ids=["cycle", "identity", "gc"],
)
def test_gradients_flow_to_translated(loss):
    a = _vol(1, 1, 8, seed=12)
    b = _vol(1, 1, 8, seed=13).requires_grad_(True)
    loss(a, b).backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["lsgan", "vanilla"])
def test_adversarial_gradient_flow(mode):
    p = torch.randn(1, 1, 3, 3, 3, requires_grad=True)
    loss = AdversarialLoss(mode=mode)
    (loss(p, True) + loss.discriminator_loss(p, p)).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- perceptual
def _perc(**kw):
    kw.setdefault("layers", ("relu1_2", "relu2_2"))
    return PerceptualLoss(**kw)


def test_vgg_layout_matches_torchvision_indices():
    assert VGG16_LAYERS["relu1_2"] == 3 and VGG16_LAYERS["relu2_2"] == 8
    assert VGG16_LAYERS["relu3_3"] == 15 and VGG16_LAYERS["relu4_3"] == 22 and VGG16_LAYERS["relu5_3"] == 29
    full = VGG16Features()
    assert len(full.features) == 31
    # torchvision vgg16 "features" parameter shapes
    sd = full.state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)
    perc = PerceptualLoss()  # default layers up to relu3_3 -> only indices 0..15 built
    assert len(perc.vgg.features) == 16


def test_perceptual_identical_zero_different_positive():
    torch.manual_seed(0)
    perc = _perc(slice_fraction=0.25)
    assert perc.weight == 1.0
    a = _vol(1, 1, 16, seed=14)
    b = _vol(1, 1, 16, seed=15)
    assert perc(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert perc(a, b).item() > 0
    mse = _perc(slice_fraction=0.25, criterion="mse")
    assert mse(a, a).item() == pytest.approx(0.0, abs=1e-7) and mse(a, b).item() > 0


def test_perceptual_grad_to_reconstructed_not_vgg():
    torch.manual_seed(0)
    perc = _perc(slice_fraction=0.25)
    a = _vol(1, 1, 16, seed=16).requires_grad_(True)
    b = _vol(1, 1, 16, seed=17).requires_grad_(True)
    perc(a, b).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert a.grad is None  # real features under no_grad
    for p in perc.vgg.parameters():
        assert not p.requires_grad and p.grad is None


def test_perceptual_slice_counts_bounded():
    torch.manual_seed(0)
    calls: list[int] = []
    perc = _perc(slice_fraction=0.25)
    perc.vgg.features[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    a = _vol(2, 1, 16, seed=18)
    b = _vol(2, 1, 16, seed=19)
    perc(a, b)
    # round(0.25*16)=4 slices per axis, 3 axes, real + reconstructed, batch 2
    assert perc.last_num_slices == 12
    assert calls == [2 * 4] * 6
    assert {k: len(v) for k, v in perc.last_slice_indices.items()} == {0: 4, 1: 4, 2: 4}

    calls.clear()
    perc.max_slices = 5
    perc(a, b)
    assert perc.last_num_slices == 5
    assert sum(calls) == 2 * 2 * 5  # (real + rec) * batch * slices
    assert sorted(len(v) for v in perc.last_slice_indices.values()) == [1, 2, 2]

    calls.clear()
    tiny = _perc(slice_fraction=0.01, axes=(2,))  # round(0.16)=0 -> at least 1
    tiny.vgg.features[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    tiny(a, b)
    assert tiny.last_num_slices == 1 and calls == [2, 2]


def test_perceptual_random_slices_repeat_with_seed():
    perc = _perc(slice_fraction=0.25)
    a = _vol(1, 1, 16, seed=20)
    b = _vol(1, 1, 16, seed=21)
    torch.manual_seed(123)
    v1 = perc(a, b)
    idx1 = {k: v.clone() for k, v in perc.last_slice_indices.items()}
    torch.manual_seed(123)
    v2 = perc(a, b)
    assert torch.equal(v1, v2)
    assert all(torch.equal(idx1[k], perc.last_slice_indices[k]) for k in idx1)


def test_perceptual_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    donor = VGG16Features()  # full trunk, like torchvision's vgg16().features
    sd = {f"features.{k}": v for k, v in donor.features.state_dict().items()}
    sd["classifier.0.weight"] = torch.randn(4, 4)
    sd["classifier.0.bias"] = torch.randn(4)
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)

    a = _vol(1, 1, 16, seed=22)
    b = _vol(1, 1, 16, seed=23)
    torch.manual_seed(1)
    rand = _perc(slice_fraction=0.25)
    torch.manual_seed(1)
    loaded = _perc(slice_fraction=0.25, pretrained=True, weights_path=str(path))
    assert torch.equal(loaded.vgg.features[0].weight, donor.features[0].weight)
    assert torch.equal(loaded.vgg.features[7].bias, donor.features[7].bias)
    assert not any(p.requires_grad for p in loaded.vgg.parameters())
    torch.manual_seed(5)
    v_rand = rand(a, b)
    torch.manual_seed(5)
    v_loaded = loaded(a, b)
    assert not torch.allclose(v_rand, v_loaded)


def test_perceptual_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.perceptual.weights_path"):
        PerceptualLoss(pretrained=True)
    with pytest.raises(FileNotFoundError, match="loss.perceptual.weights_path"):
        PerceptualLoss(pretrained=True, weights_path=str(tmp_path / "nope.pth"))


def test_perceptual_eval_mode_persists():
    perc = _perc()
    assert not perc.vgg.training
    perc.train()
    assert perc.training and not perc.vgg.training
    assert all(not m.training for m in perc.vgg.modules())
    container = torch.nn.ModuleDict({"p": perc})
    container.train()
    assert not perc.vgg.training


def test_perceptual_bad_args():
    with pytest.raises(ValueError):
        PerceptualLoss(layers=("relu9_9",))
    with pytest.raises(ValueError):
        PerceptualLoss(axes=(3,))
    with pytest.raises(ValueError):
        PerceptualLoss(max_slices=0)
