"""The optimizers of the CycleGAN: PyTorch's Adam, or Adam with its moments stored in bfloat16.

Adam keeps two moments per parameter, twice the parameters' own memory, a large share of what a
training process holds at rest (README, "Memory and speed").
:class:`BF16StateAdam` stores both moments in bfloat16 (half that) and does the update itself in fp32,
one parameter at a time. Writing a moment back to bf16 by round-to-nearest would stall the second
moment: with beta2 = 0.999 an update changes it by ~0.1 %, below half a bf16 step (0.4 %), so it stops
growing at about a fifth of its value (``tests/test_optim.py`` shows it). The write is therefore
*stochastically* rounded (unbiased: rounds up with probability equal to the remainder), the remedy of
Zamirai et al. 2020, "Revisiting BFloat16 Training". Parameters, gradients and the update stay fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mr2ct.config import OPTIMIZER_STATES

#: config value -> dtype of the Adam moments
STATE_DTYPES = {name: getattr(torch, name) for name in OPTIMIZER_STATES}


def adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float], state_dtype: str = "float32") -> torch.optim.Optimizer:
    """Adam for ``params``: ``state_dtype`` "float32" is PyTorch's; "bfloat16" is :class:`BF16StateAdam`.

    PyTorch's Adam runs the fused kernel where the parameters' device has one (CPU, CUDA), else the
    per-tensor loop; never the default multi-tensor ("foreach") path: it takes the square root of every
    second moment at once, a temporary the size of the parameters at each step (traced on the meta device).
    """
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"optimizer state dtype {state_dtype!r}: choose from {sorted(STATE_DTYPES)}")
    if state_dtype == "bfloat16":
        return BF16StateAdam(params, lr=lr, betas=betas)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused, foreach=None if fused else False)


def _round_with_noise_(x: Tensor, noise: Tensor) -> Tensor:
    """In place on fp32 ``x``: add ``noise`` (int32 in [0, 2^16)) to the low 16 bits, then clear them.

    A bf16 number is the top 16 bits of an fp32 one, so the result is exactly representable in bf16 and
    its magnitude was rounded up with probability (low bits) / 2^16: unbiased. Non-finite values must
    not pass through here (the carry could turn a NaN into -0).
    """
    bits = x.view(torch.int32)  # same element size: a view at any strides (channels-last states too)
    bits.add_(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000 as int32
    return x


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 ``x`` rounded to bfloat16 stochastically: E[result] = x; inf and NaN stay what they are."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    noise = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(0, 1 << 16, generator=generator)
    rounded = _round_with_noise_(x.clone(), noise)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class BF16StateAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba) with bfloat16 moments written back by stochastic rounding; no weight decay.

    Same hyper-parameters, state names (``step``, ``exp_avg``, ``exp_avg_sq``) and LR-scheduler
    behaviour as ``torch.optim.Adam``, so a checkpoint of either resumes in the other (moments are cast
    on load). The rounding noise of step ``t`` comes from a generator seeded with ``seed + t``: every DDP
    replica draws the same noise, so replicas stay identical, and a resumed run repeats the same steps.

    Args:
        params: parameters (fp32) or parameter groups.
        lr, betas, eps: as ``torch.optim.Adam``.
        seed: base seed of the rounding noise.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, seed: int = 0) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Adam settings lr={lr} betas={betas} eps={eps}")
        # torch's Adam keys too (at values this class implements): a checkpoint of ours loads into torch's
        keys = torch.optim.Adam([torch.zeros(1, requires_grad=True)], foreach=False).defaults
        super().__init__(params, {**keys, "lr": lr, "betas": tuple(betas), "eps": eps})
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, seeded: set[torch.device]) -> torch.Generator | None:
        """The noise generator of ``device``, seeded once per ``step()`` call from the step count."""
        if device.type == "meta":  # shape tracing (the memory planner): no arithmetic, no generator
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        if device not in seeded:
            gen.manual_seed(self.seed * 1_000_003 + step)
            seeded.add(device)
        return gen

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to the parameter's dtype (fp32) on load; the moments belong in bf16
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seeded: set[torch.device] = set()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group.get("weight_decay") or group.get("amsgrad") or group.get("maximize"):
                raise ValueError("BF16StateAdam implements plain Adam: no weight_decay, amsgrad or maximize")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BF16StateAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())  # a CPU scalar, as torch's non-capturable Adam keeps it
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                denom = v.sqrt().div_(math.sqrt(bias2)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / bias1)
                del denom
                # v >= 0 holds g^2: finite v means a finite gradient, hence finite m
                if p.device.type != "meta" and not torch.isfinite(v.max()):
                    state["exp_avg"].copy_(m)  # round to nearest: keeps the inf/NaN for the guards to see
                    state["exp_avg_sq"].copy_(v)
                    continue
                # one draw of 31 random bits per element: bits 0-15 round m, bits 15-30 round v
                gen = self._generator(p.device, t, seeded)
                noise = torch.empty(p.shape, dtype=torch.int32, device=p.device).random_(generator=gen)
                state["exp_avg"].copy_(_round_with_noise_(m, noise.bitwise_and(0xFFFF)))
                state["exp_avg_sq"].copy_(_round_with_noise_(v, noise.bitwise_right_shift_(15)))
        return loss
