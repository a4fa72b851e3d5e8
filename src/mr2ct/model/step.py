"""The CycleGAN optimisation step, written once: Lightning's ``training_step`` and the profilers both call it.

One step = the generators' update (discriminators frozen), then the discriminators' update on real
images and on fakes drawn through the history pools. How a loss is back-propagated, how parameters
are frozen and whether an update may be applied are the caller's (:class:`StepHooks`): Lightning's
``manual_backward`` / ``toggle_optimizer`` / NaN guard in training, plain PyTorch in the profilers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

#: batch entries besides the images that the generator losses read (body masks, the paired flag)
EXTRA_KEYS = ("mask_a", "mask_b", "paired")


@dataclass
class StepHooks:
    """What differs between a Trainer and a bare loop: backward, freezing the other optimizer's
    parameters, and the go-ahead for an update (``step_ok(terms, optimizer, prefix)``)."""

    backward: Callable[[Tensor], None]
    toggle: Callable[[Optimizer], None]
    untoggle: Callable[[Optimizer], None]
    step_ok: Callable[[Mapping[str, Tensor], Optimizer, str], bool]


def cyclegan_step(model: Any, opt_g: Optimizer, opt_d: Optimizer, batch: Mapping[str, Tensor],
                  hooks: StepHooks) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """One step on ``batch`` (``a``, ``b``: (B, 1, X, Y, Z), optional :data:`EXTRA_KEYS`).

    Returns the generator and discriminator loss terms, or ``None`` when ``step_ok`` refused the
    generator update: then no weight, Adam moment or image pool has changed. A refused discriminator
    update leaves the discriminators and the pools as they were.
    """
    real_a, real_b = batch["a"], batch["b"]
    if model.channels_last:
        real_a = real_a.contiguous(memory_format=torch.channels_last_3d)
        real_b = real_b.contiguous(memory_format=torch.channels_last_3d)

    hooks.toggle(opt_g)  # D params frozen: the G backward computes no D gradients
    opt_g.zero_grad(set_to_none=True)
    extras = {k: batch[k] for k in EXTRA_KEYS if k in batch}
    g_terms, fake_a, fake_b = model.generator_backward(real_a, real_b, hooks.backward, extras)
    if not hooks.step_ok(g_terms, opt_g, "g_"):  # NaN/Inf: skip the batch, pools and weights untouched
        hooks.untoggle(opt_g)
        return None
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)  # the G gradients are not needed while D trains, nor D's at the next G step
    hooks.untoggle(opt_g)

    hooks.toggle(opt_d)
    d_terms = model.discriminator_losses(real_a, real_b, fake_a, fake_b)
    opt_d.zero_grad(set_to_none=True)
    hooks.backward(d_terms["d_a"] + d_terms["d_b"])
    if hooks.step_ok(d_terms, opt_d, ""):
        opt_d.step()
        model.commit_pools()
    opt_d.zero_grad(set_to_none=True)
    hooks.untoggle(opt_d)
    return g_terms, d_terms


def plain_hooks(optimizers: Sequence[Optimizer]) -> StepHooks:
    """Hooks for a loop without a Trainer: ``loss.backward()``, Lightning's freezing rule (the parameters
    of the other optimizers stop requiring gradients, then get their flag back), every update applied."""
    saved: dict[Tensor, bool] = {}

    def toggle(opt: Optimizer) -> None:
        mine = {p for g in opt.param_groups for p in g["params"]}
        for other in optimizers:
            for g in other.param_groups:
                for p in g["params"]:
                    if p not in mine and p not in saved:
                        saved[p] = p.requires_grad
                        p.requires_grad_(False)

    def untoggle(opt: Optimizer) -> None:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        saved.clear()

    return StepHooks(backward=lambda loss: loss.backward(), toggle=toggle, untoggle=untoggle, step_ok=lambda *_: True)
