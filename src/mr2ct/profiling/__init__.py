"""Measuring speed and memory of a CycleGAN training step; shared by ``mr2ct.plan`` and ``scripts/benchmark.py``.

Three kinds of numbers:

* **ceilings** -- GFLOP/s of a Conv3d(32->32, k3) on 1x32x64³ (forward, forward+backward, NCDHW and
  channels-last-3d) and of a 2048³ fp32 matmul, medians after warm-up (:func:`conv_ceiling`,
  :func:`matmul_ceiling`);
* **exact counts on the meta device** -- the full training step (both G, both D, every active loss, both
  Adam steps; :func:`manual_step` runs the step ``CycleGAN.training_step`` runs) run on shape-only tensors: FLOPs
  with ``torch.utils.flop_counter.FlopCounterMode`` and the peak of live tensor bytes with
  ``torch.distributed._tools.mem_tracker.MemTracker`` (:func:`trace_step`). This is instant at any
  size, so the planner needs no extrapolation;
* **measurements in a fresh process** -- a real ``pl.Trainer`` fitting random patches for a few steps
  (:func:`measure`, worker ``python -m mr2ct.profiling.measure '<json>'``): median seconds per step and the
  peak RSS of the process (CUDA: max allocated), or the sliding-window translation of a volume.

CPU peak RSS = the process's runtime footprint (the imported libraries, measured) + live tensors + what the
fit adds (:func:`fit_overhead`), so :func:`predict_rss` adds the RSS of this process before any model exists
and the fitted overhead to the traced tensor peak.
"""

from __future__ import annotations

from mr2ct.profiling.ceilings import conv_ceiling, count_flops, matmul_ceiling
from mr2ct.profiling.measure import compose, measure
from mr2ct.profiling.memory import GB, current_rss, fit_overhead, peak_rss, predict_rss, runtime_rss
from mr2ct.profiling.trace import LiveTensorBytes, build_model, manual_step, optimizers, random_batch, trace_step

__all__ = ["GB", "LiveTensorBytes", "build_model", "compose", "conv_ceiling", "count_flops", "current_rss", "fit_overhead", "manual_step",
           "matmul_ceiling", "measure", "optimizers", "peak_rss", "predict_rss", "random_batch", "runtime_rss", "trace_step"]
