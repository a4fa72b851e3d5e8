"""Adam with bfloat16 moments (the optimizer-state memory saver) against PyTorch's Adam."""

from __future__ import annotations

import pytest
import torch

from mr2ct.model.optim import BF16StateAdam, adam, stochastic_round_bf16


def test_stochastic_rounding_is_unbiased_and_lands_on_bf16_neighbours():
    x = torch.full((200_000,), 1.0 + 2.0**-9)  # a quarter of the way between the bf16 numbers 1 and 1 + 2^-7
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert r.mean().item() == pytest.approx(x[0].item(), rel=2e-5)  # round-to-nearest would give 1.0
    assert (r == 1.0 + 2.0**-7).float().mean().item() == pytest.approx(0.25, abs=0.01)
    neg = stochastic_round_bf16(-x, torch.Generator().manual_seed(0)).float()
    assert neg.mean().item() == pytest.approx(-x[0].item(), rel=2e-5)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 3.0e38])
    out = stochastic_round_bf16(special, torch.Generator().manual_seed(0)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0.0


def test_round_to_nearest_would_stall_the_second_moment_and_the_optimizer_does_not():
    # why the optimizer rounds stochastically. A constant unit gradient for 1000 steps: exact second
    # moment (beta2 = 0.999) 1 - 0.999^1000 = 0.632
    exact = 1 - 0.999**1000
    v = torch.zeros(10_000, dtype=torch.bfloat16)
    for _ in range(1000):
        v = v.float().mul_(0.999).add_(0.001).to(torch.bfloat16)
    assert v.float().mean().item() < 0.5 * exact
    p = torch.nn.Parameter(torch.zeros(10_000))
    opt = BF16StateAdam([p], lr=1e-6, betas=(0.5, 0.999))
    for _ in range(1000):
        p.grad = torch.ones_like(p)
        opt.step()
    assert opt.state[p]["exp_avg_sq"].float().mean().item() == pytest.approx(exact, rel=0.01)


def _least_squares(make_opt, seed: int = 0, steps: int = 500) -> tuple[float, float, torch.optim.Optimizer, torch.nn.Module]:
    """Fit a linear model by Adam (CycleGAN's betas); returns loss, distance to the exact solution, opt, net."""
    torch.manual_seed(seed)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(256, 1)
    exact = torch.linalg.lstsq(torch.cat([x, torch.ones(256, 1)], 1), y).solution
    net = torch.nn.Linear(16, 1)
    opt = make_opt(list(net.parameters()))
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted = torch.cat([net.weight.detach().T, net.bias.detach()[:, None]])
    return loss.item(), (fitted - exact).abs().max().item(), opt, net


def test_bf16_state_adam_converges_like_torch_adam_with_half_the_state_memory():
    ref_loss, ref_err, _, _ = _least_squares(lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.5, 0.999)))
    loss, err, opt, net = _least_squares(lambda p: adam(p, lr=1e-2, betas=(0.5, 0.999), state_dtype="bfloat16"))
    assert isinstance(opt, BF16StateAdam)
    # constant-LR Adam hovers around the optimum (ref_err ~0.03); bf16 moments hover the same way
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert err < 2 * ref_err
    states = list(opt.state.values())
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    moments = sum(s[k].nbytes for s in states for k in ("exp_avg", "exp_avg_sq"))
    assert moments == sum(p.nbytes for p in net.parameters())  # two bf16 moments = one fp32 copy


def test_first_step_equals_torch_adam():
    # at step 1 Adam's update is lr * g / (|g| + eps) whatever the moments' precision
    torch.manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(1000))
    p2 = torch.nn.Parameter(p1.detach().clone())
    g = torch.randn(1000)
    p1.grad, p2.grad = g.clone(), g.clone()
    BF16StateAdam([p1], lr=1e-3, betas=(0.5, 0.999)).step()
    torch.optim.Adam([p2], lr=1e-3, betas=(0.5, 0.999)).step()
    assert torch.allclose(p1, p2, atol=1e-7)


def test_resume_repeats_the_same_steps_and_keeps_bf16_state():
    torch.manual_seed(2)
    grads = [torch.randn(64) for _ in range(6)]

    def run(p, opt, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p = torch.nn.Parameter(torch.zeros(64))
    opt = BF16StateAdam([p], lr=1e-2)
    run(p, opt, grads)
    straight = p.detach().clone()

    q = torch.nn.Parameter(torch.zeros(64))
    opt = BF16StateAdam([q], lr=1e-2)
    run(q, opt, grads[:3])
    saved = opt.state_dict()
    r = torch.nn.Parameter(q.detach().clone())
    resumed = BF16StateAdam([r], lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.state[r]["exp_avg_sq"].dtype == torch.bfloat16  # torch's loader would have made it fp32
    run(r, resumed, grads[3:])
    assert torch.equal(r, straight)

    # a checkpoint of torch's Adam resumes in ours (moments cast down) and ours in torch's (cast up)
    s = torch.nn.Parameter(torch.zeros(64))
    torch_opt = torch.optim.Adam([s], lr=1e-2)
    run(s, torch_opt, grads[:3])
    ours = BF16StateAdam([s], lr=1e-2)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.state[s]["exp_avg"].dtype == torch.bfloat16
    back = torch.optim.Adam([s], lr=1e-2)
    back.load_state_dict(ours.state_dict())
    assert back.state[s]["exp_avg"].dtype == torch.float32
    run(s, back, grads[3:])
    assert torch.isfinite(s).all()


def test_unknown_state_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, betas=(0.5, 0.999), state_dtype="float16")


def test_non_finite_gradient_stays_visible_in_the_moments():
    # the rounding's carry could turn a NaN into -0 and hide it; non-finite moments are kept as they are
    p = torch.nn.Parameter(torch.zeros(4))
    opt = BF16StateAdam([p], lr=1e-3)
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    opt.step()
    v = opt.state[p]["exp_avg_sq"].float()
    assert v[1].isnan() and v[2] == float("inf") and torch.isfinite(v[[0, 3]]).all()
