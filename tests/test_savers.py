"""Memory savers and speed switches: same gradients as the plain step, and a real fit with all of them on."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from conftest import tiny
from mr2ct.train import train


def _grads(model, real_a, real_b, expect=("adv_ab", "adv_ba", "cycle_a", "cycle_b"), backward_calls=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    calls = []
    terms, fake_a, fake_b = model.generator_backward(real_a, real_b, lambda loss: calls.append(1) or loss.backward())
    if backward_calls is not None:  # the switch is observed, not only its result
        assert len(calls) == backward_calls, len(calls)
    assert fake_a is not None and fake_b is not None and set(terms) >= set(expect), sorted(terms)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_backward_gives_the_joint_gradients(train_cfg):
    cfg = train_cfg(["generator=resnet3d_2blk", *tiny("resnet3d_2blk"), "loss=[+gc,identity,mind]"])
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="partial")
    a, b = torch.rand(1, 1, 16, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16, 16) * 2 - 1
    every_term = ("adv_ab", "adv_ba", "cycle_a", "cycle_b", "mind_ab", "mind_ba", "idt_a", "idt_b", "gc_ab", "gc_ba")
    joint = _grads(model, a, b, every_term, backward_calls=1)
    model.split_backward = True
    split = _grads(model, a, b, every_term, backward_calls=2)  # the two cycle halves, one after the other
    assert joint.keys() == split.keys() and any(k.startswith("g_ab") for k in joint)
    for name in joint:
        torch.testing.assert_close(split[name], joint[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_gives_the_same_gradients(train_cfg):
    a, b = torch.rand(1, 1, 16, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16, 16) * 2 - 1
    grads = []
    for ckpt in ("false", "true"):
        torch.manual_seed(0)
        model = instantiate(train_cfg([*tiny("unet"), f"generator.checkpointing={ckpt}"]).model, _convert_="partial")
        grads.append(_grads(model, a, b))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_switch_keeps_checkpoint_keys(train_cfg):
    plain = instantiate(train_cfg(tiny("unet")).model, _convert_="partial")
    compiled = instantiate(train_cfg([*tiny("unet"), "model.compile=true", "model.memory_format=channels_last"]).model, _convert_="partial")
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    # the switch really compiles both generators (nn.Module.compile keeps the compiled call on the module)
    assert compiled.g_ab._compiled_call_impl is not None and compiled.g_ba._compiled_call_impl is not None
    assert plain.g_ab._compiled_call_impl is None
    w = next(p for p in compiled.g_ab.parameters() if p.dim() == 5)
    assert w.is_contiguous(memory_format=torch.channels_last_3d)


def test_one_batch_fit_with_all_memory_savers(train_cfg, monkeypatch):
    """The README's all-savers command fits, and each saver is observed acting in that fit."""
    import mr2ct.nets.unet as unet_module
    from mr2ct.model import CycleGAN

    recomputed, backwards, models = [], [], []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: recomputed.append(1) or real_checkpoint(*a, **k))
    real_backward = CycleGAN.manual_backward
    monkeypatch.setattr(CycleGAN, "manual_backward", lambda self, loss, *a, **k: backwards.append(1) or models.append(self) or real_backward(self, loss, *a, **k))
    cfg = train_cfg([*tiny("unet"), "trainer.limit_train_batches=1", "model.split_backward=true", "generator.checkpointing=true",
                     "model.optimizer_state=bfloat16", "callbacks.heap_trim.enabled=true", "model.memory_format=channels_last"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_g"])) and metrics["train/loss_d"] > 0
    assert recomputed, "generator.checkpointing=true ran no checkpointed block"
    assert len(backwards) == 3  # split: the A->B->A and B->A->B halves, then the discriminators
    model = models[0]
    moments = [v for o in model.optimizers() for st in o.optimizer.state.values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    w = next(p for p in model.g_ab.parameters() if p.dim() == 5)
    assert w.is_contiguous(memory_format=torch.channels_last_3d)


def test_heap_trim_runs_after_every_backward(train_cfg):
    """callbacks.heap_trim: malloc_trim after each backward (G halves and D) of a real fit on CPU."""
    from mr2ct.training.callbacks import HeapTrim

    calls = []

    class Counting(HeapTrim):
        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            trim = self._trim
            assert trim is not None, "glibc's malloc_trim not found"
            self._trim = lambda pad: calls.append(pad) or trim(pad)

    cfg = train_cfg([*tiny("unet"), "trainer.limit_train_batches=2", "trainer.max_epochs=1", "model.split_backward=true"])
    model = instantiate(cfg.model, _convert_="partial")
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Counting()])
    trainer.fit(model, datamodule=instantiate(cfg.data))
    assert len(calls) == 2 * 3  # per batch: two generator halves and the discriminators
    off = HeapTrim(enabled=False)
    off.on_fit_start(trainer, model)
    assert off._trim is None
