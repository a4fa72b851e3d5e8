"""Speed and memory of CycleGAN training steps against this machine's own ceiling, in one run.

    python scripts/benchmark.py                                   # default generator (unet), 64³, batch 1
    python scripts/benchmark.py generator=unet,resnet3d_9blk patch=64 batch=1 steps=3 threads=1
    python scripts/benchmark.py peer=true                         # the peer's configuration (see README)
    python scripts/benchmark.py savers=none,split+ckpt,channels_last model.pool_size=10

Keys: ``generator`` (comma list), ``patch`` (64 or 32x64x64), ``batch``, ``steps`` (timed steps after one
warm-up step), ``threads`` (0 = torch's default), ``savers`` (comma list of names of
``mr2ct.plan.SAVERS``: none (the defaults, numerics auto), fp32, bf16, split, ckpt, bf16_state, trim, channels_last,
compile; several joined by +, e.g. split+ckpt+bf16_state), ``translate`` (XxYxZ volume, ``none`` to skip), ``window`` (XxYxZ, default the patch),
``peer`` (true: generator=resnet3d_9blk, PatchGAN 3 layers/64 filters, no identity, patch 32x64x64, batch 1,
translation of 64x128x128), ``out`` (JSON path), ``ceiling`` (edge of the ceiling conv's cube, default 64;
smaller only for smoke tests). Any ``a.b=c``, ``loss=...`` or ``discriminator=...`` is passed to the train config as an
override (``loss=+mind``: the step with the MIND term).
Each configuration runs in a fresh process (peak RSS is its own). Prints a table; writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from mr2ct import plan
from mr2ct import profiling as P
from mr2ct.errors import ConfigError
from mr2ct.numerics import bf16_fast, resolve
from mr2ct.training.numerics_trial import trial_axes

#: config groups passed through as overrides like any a.b=c (generator is a key of its own: a list to compare)
GROUPS = ("loss", "discriminator")
PEER = ["discriminator=patchgan", "discriminator.ndf=64", "discriminator.n_layers=3", "loss=[adversarial,cycle]",
        "generator.padding_mode=replicate"]


def saver_overrides(name: str) -> list[str]:
    try:
        return plan.saver_overrides(name)
    except ConfigError as err:
        sys.exit(f"mr2ct: error: {err}")


def _shape(text: str) -> list[int]:
    parts = [int(p) for p in str(text).lower().split("x")]
    return parts * 3 if len(parts) == 1 else parts


def main(argv: list[str]) -> dict:
    args = {"generator": "unet", "patch": "64", "batch": "1", "steps": "3", "threads": "0", "savers": "none",
            "translate": "160x160x128", "window": "", "peer": "false", "out": "benchmark.json", "ceiling": "64"}
    extra, given = [], set()
    for a in argv:
        key, _, val = a.partition("=")
        if "." in key or key.startswith(("+", "~")) or key in GROUPS:
            extra.append(a)
        elif key in args:
            args[key] = val
            given.add(key)
        else:
            sys.exit(f"mr2ct: error: unknown key {key!r} (keys: {', '.join(args)}, or a.b=c config overrides)")
    if args["peer"].lower() == "true":
        args.update(generator="resnet3d_9blk", patch="32x64x64", batch="1")
        if "translate" not in given:
            args["translate"] = "64x128x128"
        extra = [*PEER, *extra]
    for saver in args["savers"].split(","):
        saver_overrides(saver)  # unknown names fail now, not after the ceilings
    threads = int(args["threads"]) or torch.get_num_threads()
    torch.set_num_threads(threads)
    patch, batch, steps = _shape(args["patch"]), int(args["batch"]), int(args["steps"])
    window = _shape(args["window"]) if args["window"] else patch
    load0 = os.getloadavg()
    report: dict = {"threads": threads, "device": "cuda" if torch.cuda.is_available() else "cpu", "patch": patch,
                    "batch": batch, "extra_overrides": extra, "loadavg_start": load0}

    # ceilings, measured first and again at the end: the load of a shared machine drifts
    edge = int(args["ceiling"])

    bf16_native = bf16_fast(torch.device(report["device"]))

    def ceilings() -> dict:
        out = {f"conv_{'fb' if b else 'fwd'}{'_cl' if cl else ''}": P.conv_ceiling(b, cl, size=edge)
               for b in (False, True) for cl in (False, True)}
        if bf16_native:  # the ceiling of a bf16 step is bf16's (autocast: bf16 convs, fp32 weights)
            out.update({f"conv_fb_bf16{'_cl' if cl else ''}": P.conv_ceiling(True, cl, size=edge, dtype=torch.bfloat16) for cl in (False, True)})
        out["matmul"] = P.matmul_ceiling()
        return out

    c0 = ceilings()
    # bf16 vs fp32 on a tiny conv only: bf16 is hundreds of times slower on CPUs without AMX/AVX512-BF16
    # (batch 2: at batch 1 this small a conv takes PyTorch's non-oneDNN path in fp32, not comparable)
    small = dict(size=16, channels=8, batch=2, repeats=3)
    bf = P.conv_ceiling(False, False, dtype=torch.bfloat16, **small)
    fp = P.conv_ceiling(False, False, **small)
    report["bf16_over_fp32_time_small_conv"] = bf["seconds"] / fp["seconds"]
    # and at the ceiling's size, forward+backward, as training would run it (CPUs with AVX512-BF16/AMX are faster);
    # not where bf16 is emulated: there one such conv runs for many minutes
    report["bf16_over_fp32_time_conv_fb"] = (P.conv_ceiling(True, False, size=edge, dtype=torch.bfloat16, repeats=3)["seconds"]
                                             / P.conv_ceiling(True, False, size=edge, repeats=3)["seconds"]) if bf16_native else None

    runs, trained_with = [], {}
    for gen in args["generator"].split(","):
        for saver in args["savers"].split(","):
            overrides = [f"generator={gen}", f"data.patch_size=[{','.join(map(str, patch))}]", f"data.batch_size={batch}",
                         *extra, *saver_overrides(saver)]
            cfg = P.compose(overrides, resolve_auto=False)
            # mr2ct.train settles auto numerics on its first steps (mr2ct/training/numerics_trial.py)
            auto = str(cfg.trainer.precision) == "auto", str(cfg.model.memory_format) == "auto"
            resolve(cfg)  # auto numerics resolved once; the measuring process gets the same choice
            trial = trial_axes(cfg, *auto)
            overrides += [f"trainer.precision={cfg.trainer.precision}", f"model.memory_format={cfg.model.memory_format}"]
            t0 = time.time()
            m = P.measure({"kind": "train", "overrides": overrides, "steps": steps, "threads": threads,
                           "trial": trial})
            cfg.trainer.precision, cfg.model.memory_format = m["precision"], m["memory_format"]
            trained_with.setdefault(gen, [f"trainer.precision={cfg.trainer.precision}", f"model.memory_format={cfg.model.memory_format}"])
            trace = P.trace_step(cfg)  # the numerics the timed steps ran in
            pred = P.predict_rss(trace, m["runtime_rss"], pool_images=m["pool_images"], pool_size=int(cfg.model.pool_size))
            run = {"generator": gen, "saver": saver, "overrides": overrides, "median_s": m["median_s"],
                   "numerics": f"{'bf16' if 'bf16' in str(cfg.trainer.precision) else 'fp32'}{'/CL' if cfg.model.memory_format == 'channels_last' else ''}",
                   "step_times": m["step_times"], "first_step_s": m["first_step_s"], "flops": trace["flops"],
                   "trial_s": m["trial_seconds"],
                   "gflop_per_s": trace["flops"] / m["median_s"] / 1e9, "peak_rss_gb": m["peak_rss"] / P.GB,
                   "predicted_rss_gb": pred / P.GB, "tensor_peak_gb": trace["total"] / P.GB,
                   "runtime_rss_gb": m["runtime_rss"] / P.GB, "wall_s": time.time() - t0}
            run["rss_prediction_error"] = pred / m["peak_rss"] - 1
            if "peak_cuda" in m:
                run["peak_cuda_gb"] = m["peak_cuda"] / P.GB
            runs.append(run)
            print(f"[{gen} {saver}] {m['median_s']:.2f} s/step, peak {run['peak_rss_gb']:.2f} GB", flush=True)
    translations = []
    if args["translate"] != "none":
        for gen in args["generator"].split(","):
            # the numerics the first configuration trained with, as a checkpoint hands them to translate (no probe here)
            overrides = [f"generator={gen}", *extra, *trained_with.get(gen, []),
                         *(saver_overrides("channels_last") if "channels_last" in args["savers"] else [])]
            t = P.measure({"kind": "translate", "overrides": overrides, "shape": _shape(args["translate"]), "roi": window,
                           "overlap": 0.25, "sw_batch_size": "auto", "threads": threads, "preload": ["mr2ct.translate"]})
            translations.append({"generator": gen, "overrides": overrides, **t, "peak_rss_gb": t["peak_rss"] / P.GB})
    c1 = ceilings()
    ceil = {k: {"gflop_per_s": (c0[k]["gflop_per_s"] + c1[k]["gflop_per_s"]) / 2, "start": c0[k]["gflop_per_s"],
                "end": c1[k]["gflop_per_s"]} for k in c0}
    conv_fb = max(ceil["conv_fb"]["gflop_per_s"], ceil["conv_fb_cl"]["gflop_per_s"])
    conv_fb_bf16 = max((ceil[k]["gflop_per_s"] for k in ("conv_fb_bf16", "conv_fb_bf16_cl") if k in ceil), default=conv_fb)
    for run in runs:
        # against the best conv fwd+bwd ceiling of the run's own numerics (a bf16 step against bf16 convs)
        run["mfu_conv_fb"] = run["gflop_per_s"] / (conv_fb_bf16 if run["numerics"].startswith("bf16") else conv_fb)
        run["mfu_matmul"] = run["gflop_per_s"] / ceil["matmul"]["gflop_per_s"]
        base = next(r for r in runs if r["generator"] == run["generator"])
        run["time_vs_first_saver"] = run["median_s"] / base["median_s"]
    report.update(ceilings=ceil, runs=runs, translations=translations, loadavg_end=os.getloadavg())

    print(f"\nthreads {threads}, load average {load0[0]:.1f} -> {report['loadavg_end'][0]:.1f}, device {report['device']}")
    print("ceiling GFLOP/s (start/end): " + ", ".join(f"{k} {v['start']:.0f}/{v['end']:.0f}" for k, v in ceil.items()))
    print(f"bf16-autocast / fp32 time: tiny conv forward (batch 2, 8 ch, 16³) {report['bf16_over_fp32_time_small_conv']:.2f}x; "
          + (f"ceiling conv fwd+bwd (32 ch, {edge}³) {report['bf16_over_fp32_time_conv_fb']:.2f}x" if bf16_native
             else "ceiling conv not timed in bf16 (not native on this CPU)"))
    w = max([len(r["saver"]) for r in runs] + [5]) + 2
    hdr = f"{'generator':<15}{'saver':<{w}}{'numerics':>9}{'s/step':>8}{'xfirst':>7}{'TFLOP':>7}{'GFLOP/s':>9}{'MFU conv':>9}{'MFU mm':>8}{'RSS GB':>8}{'pred GB':>8}{'err':>7}"
    print(hdr)
    for r in runs:
        print(f"{r['generator']:<15}{r['saver']:<{w}}{r['numerics']:>9}{r['median_s']:>8.2f}{r['time_vs_first_saver']:>7.2f}{r['flops'] / 1e12:>7.3f}"
              f"{r['gflop_per_s']:>9.1f}{r['mfu_conv_fb']:>9.0%}{r['mfu_matmul']:>8.0%}{r['peak_rss_gb']:>8.2f}"
              f"{r['predicted_rss_gb']:>8.2f}{r['rss_prediction_error']:>7.1%}")
    for t in translations:
        print(f"translate {t['generator']} {t['shape']} windows {t['roi']} ({t['precision']}, {t['memory_format']}): {t['seconds']:.2f} s, "
              f"{t['voxels_per_s'] / 1e6:.2f} Mvoxel/s, peak RSS {t['peak_rss_gb']:.2f} GB" + "".join(f"; {c}" for c in t.get("chosen", [])))
    with open(args["out"], "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args['out']}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
