"""Tests of mr2ct.nets: shapes, ranges, size errors, checkpointing equivalence, spectral norm, init, sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mr2ct.nets import (
    PatchDiscriminator3D,
    ResnetGenerator3D,
    UNetGenerator,
    init_weights,
    monai_norm,
)
from mr2ct.nets.unet import strip_bias_before_norm

TINY_UNET = dict(channels=(4, 8, 16), strides=(2, 2))  # divisor 4
TINY_UNET_RES = dict(channels=(4, 8, 16, 16), strides=(2, 2, 2), num_res_units=2)  # divisor 8


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_generators(**kw):
    return {
        "unet": UNetGenerator(**TINY_UNET, **kw),
        "unet_res": UNetGenerator(**TINY_UNET_RES, **kw),
        "resnet": ResnetGenerator3D(ngf=4, n_blocks=2, **kw),
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["unet", "unet_res", "resnet"])
def test_generator_shape_and_range(name):
    g = tiny_generators()[name]
    d = g.divisor
    for size in [(2 * d,) * 3, (2 * d, 4 * d, 3 * d), (16, 32, 24)]:
        x = torch.randn(2, 1, *size) * 3
        y = g(x)
        assert y.shape == x.shape
        assert y.abs().max() <= 1.0


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_norm_choices(norm):
    for g in tiny_generators(norm=norm).values():
        assert g(torch.randn(2, 1, 16, 16, 16)).shape == (2, 1, 16, 16, 16)
        has_norm = any(isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d)) for m in g.modules())
        assert has_norm == (norm != "none")
    d = PatchDiscriminator3D(ndf=4, norm=norm)
    assert d(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="norm"):
        UNetGenerator(**TINY_UNET, norm="group")


def test_instance_norm_is_affine_and_no_bias_before_norm():
    for g in [*tiny_generators().values(), PatchDiscriminator3D(ndf=4)]:
        mods = list(g.modules())
        norms = [m for m in mods if isinstance(m, nn.InstanceNorm3d)]
        assert norms and all(m.affine and not m.track_running_stats for m in norms)
        for a, b in zip(mods, mods[1:]):  # registration order == execution order for these nets
            if isinstance(a, nn.modules.conv._ConvNd) and isinstance(b, nn.InstanceNorm3d):
                assert a.bias is None


def test_unet_matches_monai_unet():
    """Same topology and block order as monai.networks.nets.UNet (after removing the norm-cancelled biases)."""
    from monai.networks.nets import UNet

    for nru in (0, 2):
        kw = dict(channels=(4, 8, 16, 16), strides=(2, 2, 2), num_res_units=nru)
        g = UNetGenerator(**kw)
        ref = strip_bias_before_norm(UNet(3, 1, 1, norm=monai_norm("instance"), **kw))
        pg, pr = list(g.parameters()), list(ref.parameters())
        assert [p.shape for p in pg] == [p.shape for p in pr]
        with torch.no_grad():
            for a, b in zip(pg, pr):
                a.copy_(b)
        x = torch.randn(1, 1, 16, 32, 24)
        torch.testing.assert_close(g(x), torch.tanh(ref(x)))


@pytest.mark.parametrize("name", ["unet", "unet_res", "resnet"])
def test_non_divisible_size_raises(name):
    g = tiny_generators()[name]
    bad = (g.divisor * 4, g.divisor * 4 + 2, g.divisor * 4)
    with pytest.raises(ValueError, match="divisible"):
        g(torch.randn(1, 1, *bad))


def test_resnet_padding_modes():
    for mode in ("reflect", "replicate", "zeros"):
        g = ResnetGenerator3D(ngf=4, n_blocks=1, padding_mode=mode)
        assert g(torch.randn(1, 1, 8, 12, 16)).shape == (1, 1, 8, 12, 16)
    with pytest.raises(ValueError, match="padding_mode"):
        ResnetGenerator3D(ngf=4, padding_mode="circular")


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["unet", "unet_res", "resnet"])
def test_checkpointing_identical(name):
    """Activation checkpointing changes neither outputs nor gradients; all parameters get a gradient."""
    dropout = 0.3  # also exercises RNG-state preservation of the recomputation
    g = tiny_generators(dropout=dropout)[name]
    g.train()
    x = torch.randn(1, 1, 16, 24, 16, requires_grad=True)
    target = torch.rand(1, 1, 16, 24, 16) * 2 - 1
    results = []
    for ckpt in (False, True):
        g.checkpointing = ckpt
        g.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(123)
        y = g(x)
        ((y - target) ** 2).mean().backward()
        results.append((y.detach(), _grads(g), x.grad.clone()))
    (y0, g0, x0), (y1, g1, x1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(x1, x0, rtol=1e-6, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # every parameter receives a (non-zero) gradient
    for (pname, _), gr in zip(g.named_parameters(), g0):
        assert gr.abs().sum() > 0, pname


def test_discriminator_shapes_and_size_error():
    d = PatchDiscriminator3D(ndf=4, n_layers=3)
    assert d.min_input_size == 24
    assert d(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1, 2, 2, 2)
    assert d(torch.randn(1, 1, 24, 40, 64)).shape == (1, 1, 1, 3, 6)
    assert d.output_size((32, 48, 33)) == (2, 4, 2)
    with pytest.raises(ValueError, match="too small"):
        d(torch.randn(1, 1, 16, 32, 32))
    d2 = PatchDiscriminator3D(in_channels=2, ndf=4, n_layers=2)
    assert d2(torch.randn(1, 2, 16, 16, 20)).shape == (1, 1, 2, 2, 3)
    # gradients reach every parameter
    d.zero_grad()
    d(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())



def test_full_res_layer_keeps_shapes_and_sees_single_voxels():
    """The stride-1 layer in front changes neither the logits' shape nor the size limit."""
    d = PatchDiscriminator3D(ndf=4, n_layers=2, full_res_layer=True)
    plain = PatchDiscriminator3D(ndf=4, n_layers=2)
    assert d.min_input_size == plain.min_input_size
    assert d(torch.randn(1, 1, 16, 16, 20)).shape == plain(torch.randn(1, 1, 16, 16, 20)).shape == (1, 1, 2, 2, 3)
    first = d.model[0]
    assert isinstance(first, nn.Conv3d) and first.stride == (1, 1, 1) and first.kernel_size == (3, 3, 3)
    assert isinstance(plain.model[0], nn.Conv3d) and plain.model[0].stride == (2, 2, 2)
    assert first(torch.randn(1, 1, 16, 16, 16)).shape[2:] == (16, 16, 16)
    d.zero_grad()
    d(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())

@pytest.mark.parametrize("layout", [TINY_UNET, TINY_UNET_RES], ids=["unet", "unet_res"])
def test_input_skip_starts_from_the_inverted_input_and_learns(layout):
    """``input_skip=-1``: an initialised generator writes about ``tanh(-x)``; the scalar gets a gradient."""
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    g = init_weights(UNetGenerator(**layout, input_skip=-1.0))
    y = g(x)
    assert torch.corrcoef(torch.stack([y.flatten(), x.flatten()]))[0, 1] < -0.7  # residual units add their own output
    y.mean().backward()
    assert g.input_skip.grad is not None and g.input_skip.grad != 0
    plain = init_weights(UNetGenerator(**layout))  # off: no parameter, the state dict of earlier checkpoints
    assert plain.input_skip is None and "input_skip" not in plain.state_dict() and "input_skip" in g.state_dict()
    assert abs(torch.corrcoef(torch.stack([plain(x).flatten(), x.flatten()]))[0, 1]) < 0.2
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        UNetGenerator(**layout, out_channels=2, input_skip=-1.0)


def test_top_norm_false_lets_the_output_keep_the_decoders_scale():
    """With residual units the top up-conv is ``out_channels`` wide; its norm erases the scale the decoder computed.

    Scaling that conv's weights leaves the output unchanged under the norm and changes it without; the default
    keeps MONAI's layout, so state dicts of earlier checkpoints still fit.
    """
    x = torch.randn(1, 1, 16, 16, 16)
    outs = {}
    for top_norm in (True, False):
        g = init_weights(UNetGenerator(**TINY_UNET_RES, top_norm=top_norm)).eval()
        up = g.decoder[-1][0]
        with torch.no_grad():
            before = g(x)
            up.conv.weight.mul_(10.0)
            outs[top_norm] = (before - g(x)).abs().max().item()
        norms = [m for m in up.modules() if isinstance(m, nn.InstanceNorm3d)]
        assert len(norms) == (1 if top_norm else 0) and (up.conv.bias is None) == top_norm
    assert outs[True] < 2e-3 and outs[False] > 0.05, outs
    old = set(UNetGenerator(**TINY_UNET_RES).state_dict())
    new = set(UNetGenerator(**TINY_UNET_RES, top_norm=False).state_dict())
    top = f"decoder.{len(TINY_UNET_RES['strides']) - 1}.0."
    assert old - new == {top + "adn.N.weight", top + "adn.N.bias"} and new - old == {top + "conv.bias"}
    plain = [UNetGenerator(**TINY_UNET, top_norm=t) for t in (True, False)]  # no residual units: no top norm either way
    assert set(plain[0].state_dict()) == set(plain[1].state_dict())


def test_spectral_norm():
    d = PatchDiscriminator3D(ndf=4, n_layers=3, spectral_norm=True)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 5
    assert all(hasattr(c, "parametrizations") and "weight" in c.parametrizations for c in convs)
    # norm layers are kept
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in d.modules()) == 3
    init_weights(d, "normal", 0.02)
    torch.testing.assert_close(
        convs[1].parametrizations.weight.original.std(), torch.tensor(0.02), rtol=0.1, atol=0
    )
    d.train()
    for _ in range(3):
        d(torch.randn(1, 1, 32, 32, 32))
    for c in convs:
        sigma = torch.linalg.matrix_norm(c.weight.detach().reshape(c.weight.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1) < 0.05, sigma
    # without spectral norm the weights are far from unit spectral norm after the CycleGAN init
    plain = init_weights(PatchDiscriminator3D(ndf=4, n_layers=3))
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())


@pytest.mark.parametrize("init_type", ["normal", "xavier", "kaiming", "orthogonal"])
def test_init_weights(init_type):
    g = ResnetGenerator3D(ngf=8, n_blocks=2)
    for p in g.parameters():
        nn.init.constant_(p, 0.5)
    assert init_weights(g, init_type, gain=0.02) is g
    convs = [m for m in g.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    norms = [m for m in g.modules() if isinstance(m, nn.InstanceNorm3d)]
    for c in convs:
        assert c.bias is None or (c.bias == 0).all()
    big = max(convs, key=lambda c: c.weight.numel()).weight
    if init_type == "normal":
        assert abs(big.mean().item()) < 0.002
        assert abs(big.std().item() - 0.02) < 0.002
    elif init_type == "kaiming":
        fan_in = big[0].numel()
        assert abs(big.std().item() - (2 / fan_in) ** 0.5) < 0.1 * (2 / fan_in) ** 0.5
    weights = torch.cat([n.weight for n in norms])
    assert abs(weights.mean().item() - 1) < 0.01 and abs(weights.std().item() - 0.02) < 0.01
    assert all((n.bias == 0).all() for n in norms)
    with pytest.raises(ValueError):
        init_weights(g, "uniform")


def _shipped(name: str) -> nn.Module:
    """The generator exactly as conf/generator/<name>.yaml builds it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mr2ct.config import CONFIG_DIR

    return instantiate(OmegaConf.load(f"{CONFIG_DIR}/generator/{name}.yaml"))()


def test_full_size_param_counts():
    """Parameter counts of the shipped networks (built from their configs, never run at full size)."""
    unet, unet_updated = _shipped("unet"), _shipped("unet_updated")
    assert list(unet.strides) == [1, 2, 2] and unet.divisor == 4  # the full-resolution first level of the CPU default
    assert unet_updated.divisor == 16
    top = unet_updated.decoder[-1][0]  # no norm over the one-channel top block (README: it erased the output's level)
    assert top.conv.bias is not None and not any(isinstance(m, nn.InstanceNorm3d) for m in top.modules())
    unet, unet_updated = n_params(unet), n_params(unet_updated)
    assert 0.4e6 < unet < 0.6e6, unet
    assert 12e6 < unet_updated < 14e6, unet_updated
    resnet9 = n_params(ResnetGenerator3D(ngf=64, n_blocks=9))
    resnet2 = n_params(ResnetGenerator3D(ngf=64, n_blocks=2))
    # 3D CycleGAN generator: 27/9 x the 2D convs (11.4 M in 2D, of which the 7x7 stem/head are 7/3 x)
    assert 33.5e6 < resnet9 < 34.5e6, resnet9
    assert resnet9 - resnet2 == 7 * (2 * 256 * 256 * 27 + 4 * 256)  # 7 blocks: 2 convs + 2 affine norms each
    patch = n_params(PatchDiscriminator3D(ndf=64))
    assert 10.5e6 < patch < 11.5e6, patch
    assert n_params(PatchDiscriminator3D(ndf=64, spectral_norm=True)) == patch


def _saved_activation_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (checkpointed regions keep only inputs)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    y.mean().backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", ["unet", "unet_res", "resnet"])
def test_checkpointing_saves_memory(name):
    g = tiny_generators()[name]
    x = torch.randn(1, 1, 16, 24, 16)
    plain = _saved_activation_bytes(g, x)
    g.checkpointing = True
    ckpt = _saved_activation_bytes(g, x)
    assert ckpt < 0.6 * plain, (ckpt, plain)


NARROW_CASES = {
    "7³ replicate + bias": lambda: nn.Conv3d(6, 1, 7, padding=3, padding_mode="replicate"),
    "3³ zeros, 2 out, no bias": lambda: nn.Conv3d(6, 2, 3, padding=1, bias=False),
    "anisotropic reflect": lambda: nn.Conv3d(6, 1, (3, 5, 7), padding=(1, 2, 3), padding_mode="reflect"),
    "even kernel": lambda: nn.Conv3d(4, 3, 4, padding=1),
    "transposed stride 1": lambda: nn.ConvTranspose3d(6, 1, 3, padding=1),
    "transposed anisotropic": lambda: nn.ConvTranspose3d(6, 2, (3, 5, 3), padding=(0, 2, 1)),
    "stride 2 (falls back)": lambda: nn.Conv3d(6, 1, 3, stride=2, padding=1),
    "oneDNN forced, small input": lambda: nn.Conv3d(8, 32, 3, padding=1),
    "oneDNN forced, replicate, stride 2": lambda: nn.Conv3d(6, 16, 3, stride=2, padding=1, padding_mode="replicate"),
    "narrow input 7³ replicate (ResNet stem)": lambda: nn.Conv3d(1, 16, 7, padding=3, padding_mode="replicate", bias=False),
    "narrow input 3³ zeros + bias": lambda: nn.Conv3d(2, 8, 3, padding=1),
    "narrow input 6 channels": lambda: nn.Conv3d(6, 32, 3, padding=1),
    "narrow input anisotropic reflect": lambda: nn.Conv3d(1, 8, (3, 5, 3), padding=(1, 2, 1), padding_mode="reflect"),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(NARROW_CASES))
def test_fast_conv_equals_torch_layer(case, channels_last):
    """The CPU-routed layers compute the same outputs and gradients as the torch layers they replace."""
    import copy

    from mr2ct.nets.cpu_conv import FastConv3d, NarrowConv3d, NarrowConvTranspose3d, NarrowInputConv3d, use_fast_convs

    ref = NARROW_CASES[case]()
    fast = use_fast_convs(copy.deepcopy(ref), narrow_max_out=3)
    assert isinstance(fast, (NarrowConv3d, NarrowConvTranspose3d) if ref.out_channels <= 3 else FastConv3d)
    assert isinstance(fast, NarrowInputConv3d) == case.startswith("narrow input")
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, ref.in_channels, 10, 12, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fast = ref(x_ref), fast(x_fast)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fast.backward(grad)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for p_fast, p_ref in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-3)


def test_narrow_head_pads_channels_last_without_autograd(monkeypatch):
    """Translation (no autograd): the replicate-padded copy is made channels-last, so oneDNN reads it without a
    blocked copy of its own; under autograd it stays contiguous (faster backward). Same outputs either way."""
    import torch.nn.functional as F

    from mr2ct.nets.cpu_conv import use_fast_convs

    ref = nn.Conv3d(6, 1, 7, padding=3, padding_mode="replicate")
    head = use_fast_convs(nn.Sequential(copy.deepcopy(ref)))
    x = torch.randn(1, 6, 10, 12, 14)
    expected = ref(x)
    seen = []
    conv3d = F.conv3d

    def spy(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous())
        return conv3d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv3d", spy)
    with torch.inference_mode():
        y = head(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        head(x)
    head(x.requires_grad_())
    assert seen == [True, True, False]


@pytest.mark.parametrize("mode", ["replicate", "reflect"])
def test_narrow_head_runs_in_slabs_along_w(monkeypatch, mode):
    """The ResNet head (padded 7³, one output) in slabs of 16 output columns: without autograd always, under
    autograd when ``w_slab`` is set (the generator sets it with checkpointing). Same outputs and gradients as
    ``nn.Conv3d``; each oneDNN call gets one slab; the backward's tensors stay well below the whole map's."""
    import torch.nn.functional as F

    from mr2ct.nets.cpu_conv import use_fast_convs
    from mr2ct.profiling import LiveTensorBytes

    ref = nn.Conv3d(6, 1, 7, padding=3, padding_mode=mode)
    head = use_fast_convs(nn.Sequential(copy.deepcopy(ref)))[0]
    x = torch.randn(1, 6, 10, 12, 40)
    x_ref = x.clone().requires_grad_()
    expected = ref(x_ref)
    expected.square().sum().backward()
    widths = []
    conv3d = F.conv3d
    monkeypatch.setattr(F, "conv3d", lambda t, *a, **k: widths.append(t.shape[-1]) or conv3d(t, *a, **k))
    with torch.inference_mode():
        torch.testing.assert_close(head(x), expected.detach(), rtol=1e-4, atol=1e-4)
    assert widths == [22, 22, 14]  # 16 + 6 halo columns, 16 + 6, 8 + 6

    def step(w_slab):
        head.w_slab, x_ = w_slab, x.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        widths.clear()
        with LiveTensorBytes([*head.parameters(), x_]) as tracker:
            head(x_).square().sum().backward()
        return x_.grad, head.weight.grad, head.bias.grad, list(widths), tracker.peak

    *grads, slab_widths, slab_peak = step(16)
    *_, whole_widths, whole_peak = step(None)
    for got, want in zip(grads, (x_ref.grad, ref.weight.grad, ref.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert slab_widths == [22, 22, 14] and whole_widths == [46]
    padded_map = 6 * 16 * 18 * 46 * 4
    assert slab_peak < whole_peak - padded_map, (slab_peak, whole_peak)


#: layer, and how many of its output phases some kernel tap reaches (each one convolution)
PHASE_CASES = {
    "ResNet up stage (3, 2, 1, 1)": (lambda: nn.ConvTranspose3d(8, 5, 3, stride=2, padding=1, output_padding=1, bias=False), 8),
    "anisotropic + bias": (lambda: nn.ConvTranspose3d(6, 4, (3, 4, 2), stride=(2, 3, 2), padding=(1, 0, 0), output_padding=(0, 2, 1)), 12),
    "stride above kernel (phases no tap reaches)": (lambda: nn.ConvTranspose3d(4, 3, 2, stride=3), 8),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(PHASE_CASES))
def test_strided_transposed_conv_runs_by_phases_without_autograd(case, channels_last, monkeypatch):
    """Without autograd a strided transposed convolution with a large output is one plain convolution per output
    phase (no ``conv_transpose3d`` and its buffer twice the output); under autograd, or below
    ``PHASE_MIN_BYTES``, it is the torch layer. Same outputs."""
    from torch.profiler import profile

    from mr2ct.nets import cpu_conv
    from mr2ct.nets.cpu_conv import PhaseConvTranspose3d, use_fast_convs

    factory, n_phases = PHASE_CASES[case]
    ref = factory()
    fast = use_fast_convs(copy.deepcopy(ref))
    assert type(fast) is PhaseConvTranspose3d and fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, ref.in_channels, 5, 6, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    expected = ref(x)

    def ops(grad: bool):
        with profile() as prof, torch.set_grad_enabled(grad):
            y = fast(x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last_3d) == expected.is_contiguous(memory_format=torch.channels_last_3d)
        return [e.name for e in prof.events()]

    out_bytes = expected.numel() * 4
    monkeypatch.setattr(cpu_conv, "PHASE_MIN_BYTES", out_bytes + 1)  # one byte too small: the torch layer
    assert "aten::conv_transpose3d" in ops(grad=False)
    monkeypatch.setattr(cpu_conv, "PHASE_MIN_BYTES", out_bytes)
    names = ops(grad=False)
    assert "aten::conv_transpose3d" not in names and names.count("aten::mkldnn_convolution") == n_phases
    assert "aten::conv_transpose3d" in ops(grad=True)


def test_resnet_checkpointing_runs_its_head_in_slabs():
    g = ResnetGenerator3D(ngf=4, n_blocks=1)
    assert g.model[-1][0].w_slab is None
    g.checkpointing = True
    assert g.model[-1][0].w_slab == 16
    assert ResnetGenerator3D(ngf=4, n_blocks=1, checkpointing=True).model[-1][0].w_slab == 16


def test_generators_use_narrow_output_convs():
    from mr2ct.nets.cpu_conv import NarrowConv3d, NarrowConvTranspose3d, PhaseConvTranspose3d

    for g in tiny_generators().values():
        convs = [m for m in g.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
        assert isinstance(convs[-1], (NarrowConv3d, NarrowConvTranspose3d)) and convs[-1].out_channels == 1
        assert all(m.out_channels == 1 for m in convs if isinstance(m, (NarrowConv3d, NarrowConvTranspose3d)))
        assert all(isinstance(m, (NarrowConvTranspose3d, PhaseConvTranspose3d)) for m in convs if isinstance(m, nn.ConvTranspose3d))


def test_narrow_input_conv_gradients_come_from_the_unfolded_input():
    """A 1-channel 7³ conv: its gradients are those of a (1, 1, 7) convolution over 49 unfolded channels."""
    from torch.profiler import profile

    from mr2ct.nets.cpu_conv import use_fast_convs

    net = use_fast_convs(nn.Sequential(nn.Conv3d(1, 16, 7, padding=3, bias=False)))
    x = torch.randn(1, 1, 8, 10, 12, requires_grad=True)
    with profile(record_shapes=True) as prof:
        net(x).sum().backward()
    backward = [e.input_shapes[1:3] for e in prof.events() if e.name == "aten::convolution_backward"]
    assert backward == [[[1, 49, 8, 10, 18], [16, 49, 1, 1, 7]]]  # (unfolded input, weight): D, H as the output, W padded


def test_fast_conv_avoids_slow_conv3d():
    """A batch-1 conv on a small input: PyTorch's own choice is the im2col kernel, FastConv3d runs oneDNN."""
    from torch.profiler import profile

    from mr2ct.nets.cpu_conv import use_fast_convs

    ref = nn.Conv3d(8, 32, 3, padding=1)
    fast = use_fast_convs(nn.Sequential(nn.Conv3d(8, 32, 3, padding=1)))
    x = torch.randn(1, 8, 8, 8, 8)
    kernels = []
    for net in (ref, fast):
        with profile() as prof:
            net(x)
        kernels.append({e.name for e in prof.events()})
    assert "aten::slow_conv3d_forward" in kernels[0]
    assert "aten::mkldnn_convolution" in kernels[1] and "aten::slow_conv3d_forward" not in kernels[1]


def test_resnet_checkpointing_keeps_no_full_resolution_feature_map():
    """Segment boundaries are at reduced resolution: the stem and the last up stage + head are in the
    segments of their low-resolution neighbours (the peer configuration's peak RSS: -0.13 GB)."""
    from mr2ct.profiling import LiveTensorBytes

    ngf = 8
    g = ResnetGenerator3D(ngf=ngf, n_blocks=1, checkpointing=True)
    x = torch.randn(1, 1, 16, 32, 32)
    tracker = LiveTensorBytes([*g.parameters(), x])
    with tracker:
        y = g(x)
    kept = tracker.current - sum(p.nbytes for p in g.parameters()) - x.nbytes - y.nbytes
    full_res_feature_map = ngf * x.nbytes
    assert 0 < kept < full_res_feature_map, (kept, full_res_feature_map)
    y.mean().backward()
    assert all(p.grad is not None for p in g.parameters())


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each aten op dispatched (below autocast, so its casts show) with its tensor arguments' dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["replicate", "reflect"])
@pytest.mark.parametrize("layer", ["fast", "narrow input", "narrow output"])
def test_padded_convs_pad_in_the_autocast_dtype(layer, mode):
    """Under bf16 autocast a replicate/reflect-padded conv pads the bf16 input (autocast would pad in fp32 and
    cast back): the torch layer's outputs and weight gradients, the input's gradient within one bf16 rounding (the
    padding's backward sums the border's gradients in bf16), the padding done on bf16 tensors."""
    from mr2ct.nets.cpu_conv import use_fast_convs

    cin, cout = {"fast": (4, 16), "narrow input": (1, 16), "narrow output": (8, 1)}[layer]
    ref = nn.Conv3d(cin, cout, 3, padding=1, padding_mode=mode)
    fast = use_fast_convs(nn.Sequential(copy.deepcopy(ref)))
    x = torch.randn(2, cin, 6, 8, 10)
    outs = []
    for net in (ref, fast):
        xi = x.clone().requires_grad_()
        with _Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(xi)
        y.float().square().sum().backward()
        pads = [dtypes[0] for name, dtypes in ops.calls if name.endswith("pad3d")]
        outs.append((y, xi.grad, [p.grad for p in net.parameters()], pads))
    (y_ref, gx_ref, gp_ref, pads_ref), (y, gx, gp, pads) = outs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert pads_ref == [torch.float32] and pads == [torch.bfloat16]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=2 ** -6, atol=2 ** -8 * gx_ref.abs().max().item())
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_of_channels_last_input_skips_the_group_norm_kernel(dtype):
    """Channels-last input on CPU: the instance norm runs the batch-norm kernel per sample (the group-norm kernel
    is many times slower there) with the same outputs and gradients, and its output stays channels-last."""
    from mr2ct.nets.norms import InstanceNorm3d

    norm = InstanceNorm3d(8, affine=True)
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias)
    x = (torch.randn(2, 8, 5, 6, 7) * 3 + 2).to(dtype)
    g = torch.randn_like(x)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        norm.zero_grad()
        xi = x.clone(memory_format=layout).requires_grad_()
        with _Ops() as ops:
            y = norm(xi)
            y.backward(g.contiguous(memory_format=layout))
        outs.append((y, xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone(), {name for name, _ in ops.calls}))
    (y_nc, gx_nc, gw_nc, gb_nc, ops_nc), (y_cl, gx_cl, gw_cl, gb_cl, ops_cl) = outs
    assert "native_group_norm" in ops_nc
    assert "native_group_norm" not in ops_cl and "native_batch_norm" in ops_cl
    assert y_cl.is_contiguous(memory_format=torch.channels_last_3d) and not y_cl.is_contiguous()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y_cl, y_nc, **tol)
    torch.testing.assert_close(gx_cl, gx_nc, **tol)
    torch.testing.assert_close(gw_cl, gw_nc, **tol)
    torch.testing.assert_close(gb_cl, gb_nc, **tol)
