"""Resident memory of a process: now, at its peak, and predicted for a training fit."""

from __future__ import annotations

import os
import resource

GB = 1024**3


def current_rss() -> int:
    """Resident set size of this process now, bytes (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes.

    Linux: VmHWM of /proc/self/status. ``getrusage``'s ru_maxrss survives exec, so a process started
    from a large parent (a long pytest session) reports the parent's size at fork as its own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: RSS a Lightning fit adds beyond the imported libraries and the live tensors: oneDNN scratchpads and
#: kernel caches, freed-but-resident heap, the loops. It grows with the voxels of a batch of patches: a
#: least-squares line through 10 measured runs on this machine (2026-11-25; unet, unet_updated,
#: resnet3d_2blk at 32³ and 64³, resnet3d_9blk at 32x64x64 and at 96³ batch 2, with and without savers:
#: 0.14-0.23 GB at 32³, 0.29-0.43 GB at 64³, 2.07 GB at 2x96³; residuals within ±0.13 GB). A constant
#: 0.11 GB (one 32³ calibration) under-predicted unet_updated at 64³ by 20-29 % and 2x96³ by 22 %.
#: The intercept is 0.04 GB below that line's 0.13: the two validation fits of tests/test_plan.py measured
#: less on a second machine (AMD EPYC, AVX512-BF16, 2026-12-03; unet 64³: 1.39-1.45 GB against a plan of
#: 1.59-1.64, +10 to +16 %; resnet3d_2blk 32³ with savers: 0.667-0.685 against 0.725, +6 to +9 %) and
#: 5.5-9.7 % less than planned on the first; the lower intercept centres both within the line's residuals.
#: 0.04 GB lower again for a third machine (AMD EPYC, AVX2 only, fp32, 2026-12-06, after MONAI stopped
#: importing Optuna/MLflow: unet 64³ measured 1.29-1.33 GB against a plan of 1.48-1.54, +14 to +15 %;
#: resnet3d_2blk 32³ with savers 0.608 against 0.616, +1 %): the unet case fits better with a lower slope,
#: but the 2x96³ run, the one a wrong plan would hurt, would then be under-predicted by 0.5 GB.
FIT_OVERHEAD_BASE = int(0.05 * GB)
FIT_OVERHEAD_PER_MVOXEL = int(1.09 * GB)


def fit_overhead(batch_voxels: int) -> int:
    """Bytes of RSS beyond libraries and tensors for a batch of ``batch_voxels`` voxels (see the constants)."""
    return int(FIT_OVERHEAD_BASE + FIT_OVERHEAD_PER_MVOXEL * batch_voxels / 1e6)


def predict_rss(trace: dict[str, float], runtime_bytes: int, pool_images: int | None = None, pool_size: int = 50) -> int:
    """CPU peak RSS of a training process: runtime footprint + :func:`fit_overhead` + traced tensor peak + the pools.

    ``runtime_bytes``: RSS of a process that imported torch, Lightning and mr2ct (see :func:`runtime_rss`);
    ``pool_images``: images per history pool (``None``: full, ``pool_size``).
    """
    pool = trace["pool"] if pool_images is None else trace["pool"] * min(pool_images, pool_size) / max(pool_size, 1)
    return int(runtime_bytes + fit_overhead(trace["batch_voxels"]) + trace["total"] + pool)


def runtime_rss() -> int:
    """RSS of this process once the training stack is imported (the base of :func:`predict_rss`): what
    ``python -m mr2ct.train`` imports before it builds anything."""
    import pytorch_lightning  # noqa: F401

    import mr2ct.data.datamodules  # noqa: F401
    import mr2ct.model.cyclegan  # noqa: F401

    return current_rss()
