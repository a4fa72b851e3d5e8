"""The CycleGAN LightningModule: MRI (domain A) <-> CT (domain B), the whole algorithm on one screen.

Notation follows Zhu et al. 2017 (and junyanz/pytorch-CycleGAN-and-pix2pix), with names that say
the direction: ``g_ab`` translates A->B (MRI->CT), ``g_ba`` B->A; ``d_a`` judges domain-A images
(real MRI vs fake MRI), ``d_b`` domain-B images.

Per training batch (manual optimisation, two optimizers):

1. forward:   fake_b = G_ab(a), rec_a = G_ba(fake_b), fake_a = G_ba(b), rec_b = G_ab(fake_a)
2. G step:    L_G = w_adv [LS(D_b(fake_b), 1) + LS(D_a(fake_a), 1)]
                  + l_cyc [|rec_a - a| + |rec_b - b|]
                  + l_idt l_cyc [|G_ab(b) - b| + |G_ba(a) - a|]                 (identity, optional)
                  + w_gc [(1 - GC(a, fake_b)) + (1 - GC(b, fake_a))]               (optional)
                  + w_mind [|MIND(a) - MIND(fake_b)| + |MIND(b) - MIND(fake_a)|]   (optional)
                  + w_per [P(a, rec_a) + P(b, rec_b)]                              (optional)
                  + w_pair [|fake_b - b|_body (+ |fake_a - a|_body)]  on registered pairs only (optional)
   With ``mask_losses`` the cycle, identity and MIND terms are averaged over the body voxels only.
3. D step:    L_D = 1/2 [LS(D_a(a), 1) + LS(D_a(pool_a(fake_a)), 0)] + same for B, on the fakes of
              step 1 (detached; never recomputed) drawn through a 50-image history pool.

The learning rate is constant for ``n_epochs`` and decays linearly to zero over ``n_epochs_decay``.
With ``output_init="body_median"`` each generator starts out writing its target domain's median body
intensity (measured on training patches) instead of 0, the middle of the intensity window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import MetaTensor
from torch import Tensor, nn

from mr2ct.data.transforms import hu_to_unit, unit_to_hu
from mr2ct.errors import ConfigError
from mr2ct.inference import translate_volume
from mr2ct.model.optim import adam
from mr2ct.model.output_init import start_at_body_median
from mr2ct.model.pool import ImagePool
from mr2ct.model.step import StepHooks, cyclegan_step
from mr2ct.nets import init_weights

OPTIONAL_TERMS = ("identity", "gc", "mind", "perceptual", "paired")
OUTPUT_INITS = ("zero", "body_median")
log = logging.getLogger(__name__)


def plain(x: Tensor) -> Tensor:
    """Drop MONAI metadata: results stay plain tensors, so checkpoints hold nothing but weights and numbers."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def linear_decay(n_epochs: int, n_epochs_decay: int) -> Callable[[int], float]:
    """LR factor for epoch ``e`` (0-based): 1 for e < n_epochs, then (n + nd - e) / (nd + 1) down to 0.

    The last epoch (e = n + nd - 1) runs at 1 / (nd + 1) of the base LR, as in the CycleGAN reference.
    The factor is a pure function of the epoch and the two lengths, so a resumed run with longer
    ``n_epochs``/``n_epochs_decay`` gets the schedule recomputed for the new totals.
    """

    def factor(epoch: int) -> float:
        return max(0.0, min(1.0, (n_epochs + n_epochs_decay - epoch) / float(n_epochs_decay + 1)))

    return factor


class CycleGAN(pl.LightningModule):
    """Two generators, two discriminators, the loss set given by the config.

    Args:
        generator: builds one generator (called twice: A->B and B->A), e.g. a ``functools.partial``
            of :class:`mr2ct.nets.UNetGenerator`. Maps (B, 1, X, Y, Z) in [-1, 1] to the same shape.
        discriminator: builds one discriminator (called twice), (B, 1, X, Y, Z) -> logits map.
        losses: term name -> loss module; ``adversarial`` and ``cycle`` are required, ``identity``,
            ``gc``, ``mind``, ``perceptual`` and ``paired`` are optional. Each has a ``weight``.
        lr_g, lr_d, betas: Adam settings of the generator and discriminator optimizers.
        n_epochs, n_epochs_decay: linear LR schedule (see :func:`linear_decay`).
        pool_size: history pool size for the discriminator updates (0 disables).
        ct_window: HU window of the CT normalisation (to report metrics in HU).
        inference: sliding-window settings for whole-volume validation (roi_size, overlap, ...).
        split_backward: memory saver: back-propagate the A->B->A and B->A->B halves of the generator
            loss one after the other (same gradients, about half the live activations). Single device
            only: DDP allows one backward per forward.
        memory_format: ``contiguous`` (NCDHW) or ``channels_last`` (NDHWC weights and input patches);
            ``auto`` in the config is resolved before the model is built (:mod:`mr2ct.numerics`).
        optimizer_state: memory saver: dtype of the Adam moments, "float32" (PyTorch's Adam) or
            "bfloat16" (:class:`mr2ct.model.optim.BF16StateAdam`: half the optimizer memory, stochastic
            rounding; changes the optimizer's numerics, so off by default).
        compile: ``torch.compile`` the generators (first step pays the compilation).
        mask_losses: average the cycle, identity and MIND terms over the body voxels of each patch (the
            batch's ``mask_a``/``mask_b``) instead of the whole patch, so air does not dilute them.
        output_init: ``"zero"``: the untrained generators write 0, the middle of the window (≈ 990 HU for
            the default CT window: bone); ``"body_median"``: at the start of a new fit each generator's output
            bias is set so that it writes the median body intensity of its target domain, measured on
            ``output_init_samples`` training patches (soft tissue in CT), see :meth:`setup`.
    """

    def __init__(
        self,
        generator: Callable[[], nn.Module],
        discriminator: Callable[[], nn.Module],
        losses: Mapping[str, nn.Module],
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        n_epochs: int = 100,
        n_epochs_decay: int = 100,
        pool_size: int = 50,
        init_type: str = "normal",
        init_gain: float = 0.02,
        ct_window: Sequence[float] = (-1024.0, 3000.0),
        inference: Mapping[str, Any] | None = None,
        split_backward: bool = False,
        memory_format: str = "contiguous",
        compile: bool = False,
        optimizer_state: str = "float32",
        mask_losses: bool = False,
        output_init: str = "zero",
        output_init_samples: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator", "losses"])
        self.automatic_optimization = False
        self.g_ab, self.g_ba = generator(), generator()
        self.d_a, self.d_b = discriminator(), discriminator()
        for net in (self.g_ab, self.g_ba, self.d_a, self.d_b):
            init_weights(net, init_type, init_gain)
        missing = {"adversarial", "cycle"} - set(losses)
        if missing:
            raise ConfigError(f"the loss set needs {sorted(missing)}; got {sorted(losses)}")
        unknown = set(losses) - {"adversarial", "cycle", *OPTIONAL_TERMS}
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}")
        self.losses = nn.ModuleDict(dict(losses))
        if memory_format not in ("contiguous", "channels_last"):
            raise ValueError(f"memory_format must be 'contiguous' or 'channels_last' (auto is resolved by mr2ct.numerics), got {memory_format!r}")
        self.split_backward, self.channels_last = bool(split_backward), memory_format == "channels_last"
        self.mask_losses = bool(mask_losses)
        if output_init not in OUTPUT_INITS:
            raise ValueError(f"model.output_init must be one of {OUTPUT_INITS}, got {output_init!r}")
        self.output_init, self.output_init_samples = output_init, int(output_init_samples)
        self.output_levels: dict[str, float] | None = None  # set by setup() with body_median
        if self.channels_last:
            # NDHWC lets oneDNN skip the layout reorders around every 3D conv (faster for some nets and CPUs)
            self.to(memory_format=torch.channels_last_3d)
        if compile:
            # in place (nn.Module.compile): parameter names, hence checkpoints, stay unchanged
            self.g_ab.compile()
            self.g_ba.compile()
        self.pool_a, self.pool_b = ImagePool(pool_size), ImagePool(pool_size)
        self.inference = dict(inference or {"roi_size": (96, 96, 96)})
        # the resolved run config, stored in checkpoints so translate/evaluate can rebuild the nets
        self.run_config: dict | None = None

    # -- start ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """``output_init="body_median"``: start each generator at its target domain's median body intensity.

        Runs before the weights of a resumed run are loaded (which then replace the biases) and before DDP
        wraps the model; the levels measured on rank 0 are broadcast so every rank starts alike.
        """
        if stage != "fit" or self.output_init != "body_median":
            return
        dm = getattr(self.trainer, "datamodule", None)
        train = getattr(dm, "datasets", {}).get("train") if dm is not None else None
        if train is None:
            raise ValueError("model.output_init=body_median needs the data module's training set (mr2ct data modules)")
        self.output_levels = start_at_body_median(self, train, self.output_init_samples, self.trainer.strategy.broadcast)
        log.info("generators start at the median body intensity of training patches: MRI %.3f, CT %.3f (normalised)",
                 self.output_levels["a"], self.output_levels["b"])

    # -- the algorithm ----------------------------------------------------------------------------
    def forward(self, real_a: Tensor) -> Tensor:
        """MRI -> synthetic CT in normalised units, (B, 1, X, Y, Z) -> same shape."""
        return self.g_ab(real_a)

    def generator_losses(
        self, real_a: Tensor, real_b: Tensor, halves: str = "ab", extras: Mapping[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """Weighted generator loss terms, and the fakes (for the discriminator step).

        ``halves`` selects the terms: ``"a"`` = everything computed from ``real_a`` (the A->B->A cycle,
        adv_ab, idt_b, gc_ab, mind_ab, perc_a, paired_ab), ``"b"`` = everything from ``real_b``, ``"ab"`` =
        both. The two halves share no activations, so they can be back-propagated one after the other
        (``split_backward``). A fake of a half not computed is returned as ``None``. ``extras`` holds the
        batch's optional ``mask_a``/``mask_b`` (body masks, (B, 1, X, Y, Z)) and ``paired`` ((B,) bool: the
        sample's a and b are the same crop of a registered pair).
        """
        L, extras = self.losses, extras or {}
        adv, lam_cyc = L["adversarial"], L["cycle"].weight
        idt_w = L["identity"].weight * lam_cyc if "identity" in L and L["identity"].weight > 0 else 0.0
        body_a, body_b = extras.get("mask_a"), extras.get("mask_b")
        mask_a, mask_b = (body_a, body_b) if self.mask_losses else (None, None)
        terms: dict[str, Tensor] = {}
        fake_a = fake_b = None
        if "a" in halves:
            fake_b = self.g_ab(real_a)
            rec_a = self.g_ba(fake_b)
            terms["adv_ab"] = adv.weight * adv(self.d_b(fake_b), True)
            terms["cycle_a"] = lam_cyc * L["cycle"](real_a, rec_a, mask_a)
        if "b" in halves:
            fake_a = self.g_ba(real_b)
            rec_b = self.g_ab(fake_a)
            terms["adv_ba"] = adv.weight * adv(self.d_a(fake_a), True)
            terms["cycle_b"] = lam_cyc * L["cycle"](real_b, rec_b, mask_b)
        if idt_w:
            if "b" in halves:
                terms["idt_a"] = idt_w * L["identity"](real_b, self.g_ab(real_b), mask_b)
            if "a" in halves:
                terms["idt_b"] = idt_w * L["identity"](real_a, self.g_ba(real_a), mask_a)
        if "gc" in L:
            if "a" in halves:
                terms["gc_ab"] = L["gc"].weight * L["gc"](real_a, fake_b)
            if "b" in halves:
                terms["gc_ba"] = L["gc"].weight * L["gc"](real_b, fake_a)
        if "mind" in L:
            if "a" in halves:
                terms["mind_ab"] = L["mind"].weight * L["mind"](real_a, fake_b, mask_a)
            if "b" in halves:
                terms["mind_ba"] = L["mind"].weight * L["mind"](real_b, fake_a, mask_b)
        if "perceptual" in L:
            if "a" in halves:
                terms["perc_a"] = L["perceptual"].weight * L["perceptual"](real_a, rec_a)
            if "b" in halves:
                terms["perc_b"] = L["perceptual"].weight * L["perceptual"](real_b, rec_b)
        if "paired" in L:
            terms.update(self._paired_terms(halves, real_a, real_b, fake_a, fake_b, extras.get("paired"), body_b))
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return terms, detach(fake_a), detach(fake_b)

    def _paired_terms(self, halves, real_a, real_b, fake_a, fake_b, paired, body) -> dict[str, Tensor]:
        """Supervised L1 on the registered pairs of the batch, in the CT's body; zero when the batch has none."""
        term = self.losses["paired"]
        sel = paired.nonzero().flatten() if paired is not None else None
        out: dict[str, Tensor] = {}
        directions = [("a", "paired_ab", fake_b, real_b)] + ([("b", "paired_ba", fake_a, real_a)] if term.reverse else [])
        for half, name, pred, target in directions:
            if half not in halves:
                continue
            if sel is None or sel.numel() == 0:
                out[name] = pred.new_zeros(())
            else:
                mask = body[sel] if body is not None else None
                level = float(hu_to_unit(np.asarray(term.bone_hu), self.hparams.ct_window)) if half == "a" else None
                out[name] = term.weight * term(pred[sel], target[sel], mask, level)
        return out

    def generator_backward(
        self,
        real_a: Tensor,
        real_b: Tensor,
        backward: Callable[[Tensor], None],
        extras: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Generator losses and their backward (``backward(loss)``); gradients accumulate in ``.grad``.

        With ``split_backward`` the A->B->A half is back-propagated before the B->A->B half is even
        computed, so only one half's activations are alive at a time (about half the peak); the
        summed gradients are those of the joint loss.
        """
        if not self.split_backward:
            terms, fake_a, fake_b = self.generator_losses(real_a, real_b, "ab", extras)
            backward(torch.stack(list(terms.values())).sum())
            return terms, fake_a, fake_b
        terms_a, _, fake_b = self.generator_losses(real_a, real_b, "a", extras)
        backward(torch.stack(list(terms_a.values())).sum())
        terms_b, fake_a, _ = self.generator_losses(real_a, real_b, "b", extras)
        backward(torch.stack(list(terms_b.values())).sum())
        return {**terms_a, **terms_b}, fake_a, fake_b

    def discriminator_losses(self, real_a: Tensor, real_b: Tensor, fake_a: Tensor, fake_b: Tensor) -> dict[str, Tensor]:
        """D losses on real images and on fakes drawn through the history pools, which stay unchanged until
        :meth:`commit_pools` (called once the D step is taken: a skipped batch leaves them as they were)."""
        adv = self.losses["adversarial"]
        fake_a, self._pool_next_a = self.pool_a.draw(fake_a)
        fake_b, self._pool_next_b = self.pool_b.draw(fake_b)
        return {
            "d_a": adv.discriminator_loss(self.d_a(real_a), self.d_a(fake_a)),
            "d_b": adv.discriminator_loss(self.d_b(real_b), self.d_b(fake_b)),
        }

    def commit_pools(self) -> None:
        self.pool_a.commit(self._pool_next_a)
        self.pool_b.commit(self._pool_next_b)

    def _step_ok(self, terms: Mapping[str, Tensor], optimizer: Any, prefix: str = "") -> bool:
        """Ask the non-finite guard (:class:`mr2ct.training.nonfinite.NonFiniteGuard`, attached at fit start) before a step."""
        guard = getattr(self, "nonfinite_guard", None)
        return True if guard is None else guard.ok(self.trainer, terms, optimizer, prefix)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        hooks = StepHooks(backward=self.manual_backward, toggle=self.toggle_optimizer, untoggle=self.untoggle_optimizer, step_ok=self._step_ok)
        done = cyclegan_step(self, opt_g, opt_d, batch, hooks)
        if done is None:  # skipped by the non-finite guard
            return
        g_terms, d_terms = done
        loss_g = torch.stack([v.detach() for v in g_terms.values()]).sum()
        loss_d = d_terms["d_a"] + d_terms["d_b"]
        real_a = batch["a"]
        logs = {f"train/g_{k}": v.detach() for k, v in g_terms.items()}
        logs.update({f"train/{k}": v.detach() for k, v in d_terms.items()})
        self.log_dict(logs, batch_size=real_a.shape[0])
        self.log("train/loss_g", loss_g.detach(), prog_bar=True, batch_size=real_a.shape[0])
        self.log("train/loss_d", loss_d.detach(), prog_bar=True, batch_size=real_a.shape[0])

    def on_train_epoch_end(self) -> None:
        # manual optimisation: Lightning does not step the schedulers
        for sch in self.lr_schedulers():
            sch.step()

    def on_train_start(self) -> None:
        # a resumed checkpoint's param groups overwrite the kernel choice of adam() (a checkpoint of the
        # bf16-state optimizer carries foreach=False, fused=None): choose again for this run
        for opt in self.optimizers():
            opt = getattr(opt, "optimizer", opt)
            if type(opt) is torch.optim.Adam:
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = opt.defaults["fused"], opt.defaults["foreach"]

    def on_train_epoch_start(self) -> None:
        # Set the LR from the schedule's formula, not from the restored optimizer state: a resumed run
        # whose n_epochs/n_epochs_decay were extended gets the new schedule from its first epoch on.
        for sch in self.lr_schedulers():
            for group, base_lr, fn in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
                group["lr"] = base_lr * fn(sch.last_epoch)
        opt_g, opt_d = self.optimizers()
        self.log("lr/g", opt_g.param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        self.log("lr/d", opt_d.param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)

    # -- validation on whole paired volumes --------------------------------------------------------
    def translate(self, volume: Tensor, direction: str = "a2b") -> Tensor:
        """Whole-volume sliding-window translation in normalised units."""
        net = self.g_ab if direction == "a2b" else self.g_ba
        cfg = self.inference
        return translate_volume(
            net,
            volume,
            roi_size=cfg["roi_size"],
            overlap=cfg.get("overlap", 0.25),
            sw_batch_size=cfg.get("sw_batch_size", 4),
            mode=cfg.get("mode", "gaussian"),
            memory_format="channels_last" if self.channels_last else "contiguous",  # precision: the trainer's autocast
        )

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """MAE / PSNR / SSIM in the body and bone Dice of one whole paired volume (as ``evaluate``)."""
        from mr2ct.evaluation.metrics import case_metrics  # one implementation for validation and evaluate

        real_a, real_b = plain(batch["a"]), plain(batch["b"])
        fake_b = self.translate(real_a, "a2b")
        window = self.hparams.ct_window
        bone = plain(batch["bone"])[0, 0] > 0.5 if "bone" in batch else None
        m = case_metrics(unit_to_hu(fake_b[0, 0], window), unit_to_hu(real_b[0, 0], window), bone)
        for name, value in m.items():
            self.log(f"val/{name}", value, on_epoch=True, prog_bar=name in ("mae", "dice"), batch_size=1, sync_dist=True)
        return {"fake_b": fake_b}

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        from mr2ct.evaluation.metrics import case_metrics

        real_a, real_b = plain(batch["a"]), plain(batch["b"])
        fake_b = self.translate(real_a, "a2b")
        window = self.hparams.ct_window
        bone = plain(batch["bone"])[0, 0] > 0.5 if "bone" in batch else None
        m = case_metrics(unit_to_hu(fake_b[0, 0], window), unit_to_hu(real_b[0, 0], window), bone, mri=real_a[0, 0])
        for name, value in m.items():
            self.log(f"test/{name}", value, on_epoch=True, batch_size=1, sync_dist=True)

    # -- optimisation and checkpoint state ---------------------------------------------------------
    def configure_optimizers(self):  # type: ignore[override]
        hp = self.hparams
        gen_params = [*self.g_ab.parameters(), *self.g_ba.parameters()]
        gen_params += [p for p in self.losses.parameters() if p.requires_grad]
        state = hp.optimizer_state
        opt_g = adam(gen_params, lr=hp.lr_g, betas=tuple(hp.betas), state_dtype=state)
        opt_d = adam([*self.d_a.parameters(), *self.d_b.parameters()], lr=hp.lr_d, betas=tuple(hp.betas), state_dtype=state)
        decay = linear_decay(hp.n_epochs, hp.n_epochs_decay)
        sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
        sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
        return [opt_g, opt_d], [sch_g, sch_d]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["image_pools"] = {"a": self.pool_a.state_dict(), "b": self.pool_b.state_dict()}
        if self.run_config is not None:
            checkpoint["mr2ct_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pools = checkpoint.get("image_pools")
        if pools:
            self.pool_a.load_state_dict(pools["a"], self.device)
            self.pool_b.load_state_dict(pools["b"], self.device)

