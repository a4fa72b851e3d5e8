"""Where the time of one CycleGAN training step goes, and what each CPU optimisation of mr2ct.nets buys.

    python scripts/profile_step.py                                     # default generator, 64³, batch 1
    python scripts/profile_step.py generator=resnet3d_9blk data.patch_size=[32,64,64] top=15
    python scripts/profile_step.py ablate=false                        # the profile only

Prints the ``torch.profiler`` table of one step (ops grouped by input shape, sorted by self time), then
-- with ``ablate=true`` -- the median step time with the optimisations switched on one at a time, from
PyTorch's own layers to what the generators use:

1. torch defaults: ``nn.InstanceNorm3d``, ``nn.Conv3d`` / ``nn.ConvTranspose3d``;
2. instance norm through the group-norm kernel (:class:`mr2ct.nets.norms.InstanceNorm3d`);
3. narrow output convolutions (:mod:`mr2ct.nets.cpu_conv`);
4. oneDNN forced for small inputs (:class:`mr2ct.nets.cpu_conv.FastConv3d`);
5. the backward of narrow-input convolutions on the unfolded input (:class:`mr2ct.nets.cpu_conv.NarrowInputConv3d`)
   -- what the nets run.

Keys: ``steps`` (timed steps per variant, after one warm-up), ``threads`` (0 = torch's default), ``top``
(profiler rows), ``ablate``, ``variants`` (``all``, or numbers from the list above, repeats allowed: ``4,5,4,5``),
``ceiling`` (edge of the ceiling conv's cube, default 64); any ``a.b=c`` is a
train-config override. The step is
:func:`mr2ct.model.step.cyclegan_step` (the step training runs, without a Trainer).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mr2ct import profiling as P
from mr2ct.nets import cpu_conv
from mr2ct.nets.norms import InstanceNorm3d

#: variant -> the classes switched back to PyTorch's own (class -> torch class)
UNDO = {
    "torch defaults": {InstanceNorm3d: nn.InstanceNorm3d, cpu_conv.NarrowConv3d: nn.Conv3d,
                       cpu_conv.NarrowConvTranspose3d: nn.ConvTranspose3d, cpu_conv.FastConv3d: nn.Conv3d,
                       cpu_conv.NarrowInputConv3d: nn.Conv3d},
    "+ group-norm instance norm": {cpu_conv.NarrowConv3d: nn.Conv3d, cpu_conv.NarrowConvTranspose3d: nn.ConvTranspose3d,
                                   cpu_conv.FastConv3d: nn.Conv3d, cpu_conv.NarrowInputConv3d: nn.Conv3d},
    "+ narrow output convs": {cpu_conv.FastConv3d: nn.Conv3d, cpu_conv.NarrowInputConv3d: nn.Conv3d},
    "+ oneDNN for small inputs": {cpu_conv.NarrowInputConv3d: cpu_conv.FastConv3d},
    "+ narrow-input backward (as shipped)": {},
}


def _swap(model: nn.Module, classes: dict[type, type]) -> dict[nn.Module, type]:
    """Set each generator layer of a listed class to its replacement; returns the originals to restore."""
    original = {}
    for g in (model.g_ab, model.g_ba):
        for m in g.modules():
            if type(m) in classes:
                original[m] = type(m)
                m.__class__ = classes[type(m)]
    return original


def main(argv: list[str]) -> None:
    args = {"steps": "3", "threads": "0", "top": "12", "ablate": "true", "ceiling": "64", "variants": "all"}
    overrides = []
    for a in argv:
        key, _, val = a.partition("=")
        if key in args:
            args[key] = val
        elif "." in key or key in ("generator", "discriminator", "loss", "data", "model"):
            overrides.append(a)
        else:
            sys.exit(f"mr2ct: error: unknown key {key!r} (keys: {', '.join(args)}, or train-config overrides)")
    if not any(o.startswith("data.patch_size=") for o in overrides):
        overrides.append("data.patch_size=[64,64,64]")
    if int(args["threads"]):
        torch.set_num_threads(int(args["threads"]))
    cfg = P.compose(overrides)
    torch.manual_seed(0)
    model = P.build_model(cfg)
    opts = P.optimizers(model)
    data = P.random_batch(int(cfg.data.batch_size), list(cfg.data.patch_size))
    step = lambda: P.manual_step(model, opts, data["a"], data["b"])  # noqa: E731
    # counted on the meta device: the counter does not see oneDNN's op when FastConv3d calls it directly
    flops = P.trace_step(cfg)["flops"]
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(f"{' '.join(overrides)}: {torch.get_num_threads()} threads, {flops / 1e12:.3f} TFLOP per step")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=int(args["top"]), max_name_column_width=32, max_shapes_column_width=64))
    if args["ablate"].lower() != "true":
        return
    edge = int(args["ceiling"])
    ceiling = max(P.conv_ceiling(True, False, size=edge)["gflop_per_s"], P.conv_ceiling(True, True, size=edge)["gflop_per_s"])
    rows = []
    names = list(UNDO) if args["variants"] == "all" else [list(UNDO)[int(i) - 1] for i in args["variants"].split(",")]
    for name in names:
        original = _swap(model, UNDO[name])
        step()  # warm-up: oneDNN picks kernels per shape
        times = []
        for _ in range(int(args["steps"])):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        for m, cls in original.items():
            m.__class__ = cls
        rows.append((name, statistics.median(times)))
    print(f"\nconv fwd+bwd ceiling {ceiling:.0f} GFLOP/s (best of NCDHW / channels-last)")
    print(f"{'variant':<42}{'s/step':>8}{'x first':>9}{'GFLOP/s':>9}{'of ceiling':>11}")
    for name, t in rows:
        print(f"{name:<42}{t:>8.2f}{t / rows[0][1]:>9.2f}{flops / t / 1e9:>9.1f}{flops / t / 1e9 / ceiling:>11.0%}")


if __name__ == "__main__":
    main(sys.argv[1:])
