"""Measuring speed and memory of a CycleGAN training step; shared by ``mr2ct.plan`` and ``scripts/benchmark.py``.

Three kinds of numbers:

* **ceilings** -- GFLOP/s of a Conv3d(32->32, k3) on 1x32x64³ (forward, forward+backward, NCDHW and
  channels-last-3d) and of a 2048³ fp32 matmul, medians after warm-up (:func:`conv_ceiling`,
  :func:`matmul_ceiling`);
* **exact counts on the meta device** -- the full training step (both G, both D, every active loss, both
  Adam steps; :func:`manual_step` mirrors ``CycleGAN.training_step``) run on shape-only tensors: FLOPs
  with ``torch.utils.flop_counter.FlopCounterMode`` and the peak of live tensor bytes with
  ``torch.distributed._tools.mem_tracker.MemTracker`` (:func:`trace_step`). This is instant at any
  size, so the planner needs no extrapolation;
* **measurements in a fresh process** -- a real ``pl.Trainer`` fitting random patches for a few steps
  (:func:`measure`, worker ``python -m mr2ct.profiling '<json>'``): median seconds per step and the
  peak RSS of the process (CUDA: max allocated), or the sliding-window translation of a volume.

CPU peak RSS = the process's runtime footprint (libraries, ~0.4 GB, measured) + live tensors + what the
fit adds (:func:`fit_overhead`), so :func:`predict_rss` adds the RSS of this process before any model exists
and the fitted overhead to the traced tensor peak.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

GB = 1024**3


# -- ceilings -----------------------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (convolutions and matmuls; norms and pointwise ops count 0)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv_ceiling(
    backward: bool,
    channels_last: bool,
    size: int = 64,
    channels: int = 32,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 5,
) -> dict[str, float]:
    """GFLOP/s of Conv3d(channels->channels, k3, pad 1) on (batch, channels, size³); median of ``repeats``.

    ``dtype=torch.bfloat16`` runs under autocast (fp32 weights), as mixed-precision training would.
    """
    device = torch.device(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(device, memory_format=fmt)
    x = torch.randn(batch, channels, size, size, size, device=device).contiguous(memory_format=fmt)
    x.requires_grad_(backward)
    autocast = dtype != torch.float32

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            y = conv(x)
        if backward:
            y.backward(torch.ones_like(y))

    flops = count_flops(run)
    seconds = _median_time(run, repeats, sync=_sync(device))
    return {"seconds": seconds, "gflops": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}


def matmul_ceiling(n: int = 2048, device: str | torch.device = "cpu", repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an fp32 (n x n) @ (n x n) matmul; median of ``repeats``."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = _median_time(lambda: a @ b, repeats, sync=_sync(device))
    return {"seconds": seconds, "gflop_per_s": 2 * n**3 / seconds / 1e9}


# -- the step, run by hand (meta device) ---------------------------------------------------------------
def build_model(cfg: DictConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The CycleGAN LightningModule of ``cfg.model`` (the real config), with its parameters on ``device``."""
    from hydra.utils import instantiate

    if str(cfg.model.get("memory_format")) == "auto":
        if torch.device(device).type != "meta":
            raise ValueError("model.memory_format=auto: resolve it first (mr2ct.numerics.resolve, done by compose)")
        cfg = copy.deepcopy(cfg)  # shapes only: the layout changes no byte count
        cfg.model.memory_format = "contiguous"
    with torch.device(device):
        return instantiate(cfg.model, _convert_="partial")


def random_batch(batch: int, patch: Sequence[int], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Unpaired patches in [-1, 1]: {"a": (B, 1, X, Y, Z), "b": same}."""
    shape = (batch, 1, *[int(p) for p in patch])
    return {k: torch.rand(shape, device=device) * 2 - 1 for k in ("a", "b")}


def manual_step(model: Any, opts: Sequence[torch.optim.Optimizer], real_a: Tensor, real_b: Tensor) -> None:
    """One CycleGAN training step as ``CycleGAN.training_step`` does it, without a Trainer.

    Uses the model's own ``generator_backward`` (so ``split_backward`` is honoured) and
    ``discriminator_losses``; the discriminators are frozen during the G backward as
    ``toggle_optimizer`` does.
    """
    opt_g, opt_d = opts
    if getattr(model, "channels_last", False):
        real_a = real_a.contiguous(memory_format=torch.channels_last_3d)
        real_b = real_b.contiguous(memory_format=torch.channels_last_3d)
    d_params = [*model.d_a.parameters(), *model.d_b.parameters()]
    for p in d_params:
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    _, fake_a, fake_b = model.generator_backward(real_a, real_b, lambda loss: loss.backward())
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    for p in d_params:
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    d_terms = model.discriminator_losses(real_a, real_b, fake_a, fake_b)
    (d_terms["d_a"] + d_terms["d_b"]).backward()
    opt_d.step()
    model.commit_pools()
    opt_d.zero_grad(set_to_none=True)


def _optimizers(model: Any) -> list[torch.optim.Optimizer]:
    opts, _ = model.configure_optimizers()
    return list(opts)


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the bytes held by live tensor storages while the mode is active.

    Every op output's storage is counted once when it appears and subtracted when it is freed
    (weak reference finaliser); storages alive before entry are passed as ``initial``. On the meta
    device this is the tensor peak a caching allocator would see (CUDA ``max_memory_allocated``),
    before fragmentation.
    """

    def __init__(self, initial: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        for t in initial:
            self._add(t)
        self.peak = self.current

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def _add(self, t: Tensor) -> None:
        st = t.untyped_storage()
        if st in self.seen:
            return
        nbytes = st.nbytes()
        self.seen[st] = nbytes
        self.current += nbytes
        weakref.finalize(st, self._free, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def _state_tensors(model: torch.nn.Module, opts: Sequence[torch.optim.Optimizer]) -> list[Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for opt in opts:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor) and v.device.type == "meta"]
    for pool in (model.pool_a, model.pool_b):
        tensors += pool.images
    return tensors


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t.untyped_storage()): t for t in tensors}.values())


def trace_step(cfg: DictConfig, half_precision: bool = False) -> dict[str, float]:
    """FLOPs and tensor-memory peak of one training step of ``cfg`` traced on the meta device.

    Returns bytes: ``state`` (parameters, gradients, Adam moments: what lives between steps),
    ``total`` (the peak of live tensors during a steady-state step, state included),
    ``act`` = total - state; ``pool`` (the two history pools when full, which a long run adds),
    ``flops`` of the step and ``batch_voxels`` (batch size x patch voxels). ``half_precision`` traces with the model and patches in bf16 (only ``act``
    is meaningful then: mixed precision keeps fp32 weights, gradients and optimizer states).
    """
    model = build_model(cfg, "meta")
    for g in (model.g_ab, model.g_ba):
        g._compiled_call_impl = None  # no compilation on shape-only tensors
    dtype = torch.bfloat16 if half_precision else torch.float32
    model.to(dtype)
    batch, patch = int(cfg.data.batch_size), list(cfg.data.patch_size)
    data = {k: v.to(dtype) for k, v in random_batch(batch, patch, "meta").items()}
    opts = _optimizers(model)
    # first step: creates the Adam states (and counts the FLOPs); the second is the steady state
    flops = count_flops(lambda: manual_step(model, opts, data["a"], data["b"]))
    for pool in (model.pool_a, model.pool_b):
        pool.images.clear()
    params = [p for p in model.parameters() if p.requires_grad]
    state = _nbytes([*model.parameters(), *model.buffers()]) + _nbytes(params) + _nbytes(
        [v for o in opts for st in o.state.values() for v in st.values() if isinstance(v, Tensor) and v.device.type == "meta"]
    )
    tracker = LiveTensorBytes([*_state_tensors(model, opts), *data.values()])
    with tracker:
        manual_step(model, opts, data["a"], data["b"])
    voxels = int(torch.tensor([int(p) for p in patch]).prod())
    return {
        "state": state, "total": tracker.peak, "act": tracker.peak - state,
        "pool": 2 * int(cfg.model.pool_size) * voxels * torch.finfo(dtype).bits // 8, "flops": flops,
        "batch_voxels": batch * voxels,
    }


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
FIT_OVERHEAD_BASE = int(0.13 * GB)
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
    """RSS of this process once the training stack is imported (the base of :func:`predict_rss`)."""
    import pytorch_lightning  # noqa: F401

    import mr2ct.model  # noqa: F401

    return current_rss()


# -- measurements in a fresh process -------------------------------------------------------------------
def compose(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The config as ``python -m mr2ct.<config_name> <overrides>`` runs it (outputs to a temp dir).

    For ``train``, ``auto`` precision and memory format are resolved as the tool resolves them (a probe).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mr2ct.config import CONFIG_DIR, set_project_root

    set_project_root()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = tempfile.mkdtemp(prefix="mr2ct-bench-")
    if config_name == "train":
        from mr2ct.numerics import resolve

        resolve(cfg)
    return cfg


#: config keys under ``callbacks`` that the measured training steps run with
MEMORY_CALLBACKS = ("heap_trim",)


class _StepTimer:
    """Lightning callback recording the wall time of each training batch (one full CycleGAN step)."""

    def __new__(cls, device: torch.device):  # built lazily: importing Lightning costs seconds
        import pytorch_lightning as pl

        class StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self._t0 = 0.0

            def on_train_batch_start(self, *args: Any) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t0)
                if len(self.times) == 1 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

        return StepTimer()


def _measure_train(overrides: Sequence[str], steps: int, threads: int | None) -> dict[str, Any]:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    cfg = compose(overrides)
    runtime = current_rss()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
    pl.seed_everything(0, verbose=False)
    model = build_model(cfg)
    batch, patch = int(cfg.data.batch_size), list(cfg.data.patch_size)

    class Patches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch * (steps + 1)

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {k: v[0] for k, v in random_batch(1, patch).items()}

    loader = torch.utils.data.DataLoader(Patches(), batch_size=batch)
    timer = _StepTimer(device)
    # the callbacks that change a step's memory or time; the rest (images, validation, checkpoints) do not run
    memory = [instantiate(cfg.callbacks[k]) for k in MEMORY_CALLBACKS if k in (cfg.get("callbacks") or {})]
    trainer = instantiate(
        cfg.trainer, default_root_dir=cfg.paths.output_dir, max_steps=2 * (steps + 1), max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, *memory], devices=1, strategy="auto",
    )
    trainer.fit(model, train_dataloaders=loader)
    # the first step pays allocation, oneDNN kernel selection, compilation (steps=0: memory only)
    times = timer.times[1:] or timer.times[:1]
    out: dict[str, Any] = {
        "device": device.type, "threads": torch.get_num_threads(), "step_times": times,
        "median_s": statistics.median(times), "first_step_s": timer.times[0],
        "peak_rss": peak_rss(), "runtime_rss": runtime, "steps": len(times), "pool_images": batch * (steps + 1),
    }
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def _measure_translate(
    overrides: Sequence[str], shape: Sequence[int], roi: Sequence[int], overlap: float, sw_batch_size: int | str, repeats: int
) -> dict[str, Any]:
    """What ``python -m mr2ct.translate`` runs per volume: one generator (as a checkpoint rebuilds it), the
    run's numerics (:func:`mr2ct.inference.inference_numerics`), sliding windows stitched on the CPU."""
    from hydra.utils import instantiate

    from mr2ct.inference import inference_numerics, translate_volume
    from mr2ct.nets import init_weights

    cfg = compose(overrides)
    runtime = current_rss()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, memory_format = inference_numerics(OmegaConf.to_container(cfg, resolve=True), device)
    fmt = torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format
    net = init_weights(instantiate(cfg.generator)(), str(cfg.model.init_type), float(cfg.model.init_gain)).to(device, memory_format=fmt).eval()
    vol = torch.rand(1, 1, *[int(s) for s in shape]) * 2 - 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        translate_volume(net, vol, roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="gaussian", sw_device=device, device="cpu",
                         precision=precision, memory_format=memory_format)
        _sync(device)()
        times.append(time.perf_counter() - t0)
    voxels = int(torch.tensor([int(s) for s in shape]).prod())
    med = statistics.median(times)
    return {"seconds": med, "times": times, "voxels_per_s": voxels / med, "peak_rss": peak_rss(), "runtime_rss": runtime,
            "shape": list(shape), "roi": list(roi), "precision": precision, "memory_format": memory_format}


def measure(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run a measurement ``job`` in a fresh Python process (so its peak RSS is its own) and return its result.

    ``job``: ``{"kind": "train", "overrides": [...], "steps": n}`` or ``{"kind": "translate", "overrides":
    [...], "shape": [X, Y, Z], "roi": [...], "overlap": 0.25, "sw_batch_size": 1, "repeats": 1}``; either may name
    ``"preload": [modules]`` to import first.
    """
    # A minimal environment: the calling process may carry Lightning's PL_*/rank variables, torch
    # compile/inductor settings and the like, and a measurement must not depend on what ran before it.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "mr2ct.profiling", json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MR2CT_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({job}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("MR2CT_RESULT "):])


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    for name in job.get("preload", ()):  # the modules the measured tool imports: their memory is part of its peak
        importlib.import_module(name)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job["kind"] == "train":
        return _measure_train(job["overrides"], int(job.get("steps", 3)), job.get("threads"))
    if job["kind"] == "translate":
        return _measure_translate(job["overrides"], job["shape"], job["roi"], float(job.get("overlap", 0.25)),
                                  job.get("sw_batch_size", "auto"), int(job.get("repeats", 1)))
    raise ValueError(f"unknown job kind {job['kind']!r}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print("MR2CT_RESULT " + json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
