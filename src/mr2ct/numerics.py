"""Numerics chosen per machine: training precision and memory format from a start-up probe.

``trainer.precision=auto`` and ``model.memory_format=auto`` (the defaults) are resolved before anything is
built: the run's own generator runs forward+backward on a small patch on the training device in each
candidate (fp32 or bf16 autocast, contiguous or channels-last) and the fastest safe one is kept. bf16 is a
candidate only where the hardware has it (CUDA ``is_bf16_supported``; on CPU AVX512-BF16 or AMX, without
which bf16 convolutions are emulated and hundreds of times slower). Explicit values are never changed. On one
device the ``auto`` choices are then settled on the run's own first steps (:mod:`mr2ct.training.numerics_trial`).

DDP: Lightning starts ranks 1..N-1 as copies of the launch command with ``LOCAL_RANK`` set; they read
rank 0's choice from :data:`ENV` instead of probing, so all local ranks agree. Ranks on other nodes probe
for themselves; a differing choice there costs speed only (mixed precision keeps fp32 weights and
gradients, and the memory format does not change values).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

log = logging.getLogger("mr2ct.numerics")

#: environment variable through which rank 0 hands its choice to the DDP ranks it launches
ENV = "MR2CT_NUMERICS"
PRECISIONS = {False: "32-true", True: "bf16-mixed"}
FORMATS = {False: "contiguous", True: "channels_last"}
#: a candidate replaces fp32 / contiguous only when at most this fraction of its time: the probe is small
#: and the machine may be shared, so a near-tie keeps the plain choice
MARGIN = 0.85
#: edge of the probe patch (capped by the training patch): big enough for the conv kernels to behave as in
#: training, small enough for the probe to take about a second
PROBE_EDGE = 24


@dataclass(frozen=True)
class Numerics:
    """The resolved choice: ``precision`` (a Lightning precision) and ``memory_format``, and why."""

    precision: str
    memory_format: str
    seconds: dict[str, float] = field(default_factory=dict)  # probe time per candidate, "bf16/channels_last": s
    reason: str = ""

    def summary(self) -> str:
        times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.seconds.items())
        return f"precision {self.precision}, memory format {self.memory_format} ({self.reason}{'; probe: ' + times if times else ''})"


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap pages back to the OS), or None where the C library has none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


#: glibc ``mallopt`` parameter number of M_MMAP_THRESHOLD (malloc.h)
_M_MMAP_THRESHOLD = -3


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``nbytes`` or more from its own mapping, returned to the OS when freed.

    By default glibc raises this threshold to the size of each large block freed (up to 32 MiB), so a
    forward pass's activations of a few MiB end up in the heap, where blocks of differing sizes fragment it
    and the process's resident size keeps the high-water mark of every hole. A fixed threshold keeps the
    peak near what is live, for the page faults of fresh mappings. Process-wide; False where the C
    library has no ``mallopt`` (musl, macOS, Windows).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def bf16_fast(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (else autocast would emulate them, very slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def training_device(accelerator: str) -> torch.device:
    """The device Lightning will train on for ``trainer.accelerator`` (auto: CUDA when there is one)."""
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def probe_patch(patch: Sequence[int], divisor: int = 4) -> list[int]:
    """The probe's patch: each side of the training patch capped at the first multiple of ``divisor`` >= :data:`PROBE_EDGE`."""
    edge = -(-PROBE_EDGE // divisor) * divisor
    return [min(int(p), edge) for p in patch]


def time_candidates(
    net: nn.Module, patch: Sequence[int], device: torch.device, candidates: Sequence[tuple[bool, bool]], rounds: int = 3
) -> dict[tuple[bool, bool], float]:
    """Best-of-``rounds`` seconds of one forward+backward of ``net`` on a (1, C, *patch) input per (bf16, channels_last).

    The candidates take turns within each round, so a burst of load from another process slows them
    alike instead of one of them; each runs once untimed first (oneDNN / cuDNN pick their kernels).
    """
    in_channels = next(m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))).in_channels
    nets = {False: net.to(device)}
    if any(cl for _, cl in candidates):
        nets[True] = copy.deepcopy(nets[False]).to(memory_format=torch.channels_last_3d)
    fmt = {False: torch.contiguous_format, True: torch.channels_last_3d}
    inputs = {cl: torch.randn(1, in_channels, *patch, device=device).contiguous(memory_format=fmt[cl]) for cl in nets}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(bf16: bool, cl: bool) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = nets[cl](inputs[cl])
        y.float().mean().backward()
        sync()
        nets[cl].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for bf16, cl in candidates:
        run(bf16, cl)
    best = {k: float("inf") for k in candidates}
    for _ in range(rounds):
        for k in candidates:
            best[k] = min(best[k], run(*k))
    return best


def choose(
    make_net: Callable[[], nn.Module],
    patch: Sequence[int],
    device: torch.device,
    precision: str = "auto",
    memory_format: str = "auto",
    margin: float = MARGIN,
) -> Numerics:
    """Resolve whichever of ``precision`` / ``memory_format`` is ``"auto"`` by timing ``make_net()``'s candidates."""
    if device.type == "cuda" and not torch.cuda.is_available():  # Lightning reports the missing GPU itself
        return Numerics(PRECISIONS[False] if precision == "auto" else precision, FORMATS[False] if memory_format == "auto" else memory_format,
                        reason="no CUDA device to probe")
    fixed_bf16 = None if precision == "auto" else "bf16" in str(precision)
    fixed_cl = None if memory_format == "auto" else memory_format == "channels_last"
    bf16_options = [fixed_bf16] if fixed_bf16 is not None else ([False, True] if bf16_fast(device) else [False])
    cl_options = [fixed_cl] if fixed_cl is not None else [False, True]
    if len(bf16_options) * len(cl_options) == 1:
        reason = "set explicitly" if fixed_bf16 is not None else "bf16 not native on this device"
        return Numerics(precision if fixed_bf16 is not None else PRECISIONS[False],
                        memory_format if fixed_cl is not None else FORMATS[False], reason=reason)
    net = make_net()
    patch = probe_patch(patch, int(getattr(net, "divisor", 4)))
    seconds = time_candidates(net, patch, device, [(b, c) for b in bf16_options for c in cl_options])
    del net
    trim = malloc_trim() if device.type == "cpu" else None
    if trim is not None:  # the probe's freed weights, gradients and activations would stay resident (resnet3d_9blk: 0.5 GB)
        trim(0)
    # the plainest candidate (fewest departures from fp32 / contiguous) within 1/margin of the fastest
    fastest = min(seconds.values())
    b, c = min((k for k in seconds if seconds[k] * margin <= fastest), key=lambda k: (int(k[0]) + int(k[1]), seconds[k]),
               default=min(seconds, key=seconds.get))
    names = {(bb, cc): f"{'bf16' if bb else 'fp32'}/{FORMATS[cc]}" for bb, cc in seconds}
    reason = f"probe on {device.type}, {'x'.join(map(str, patch))} patch, a change must be {1 / margin - 1:.0%} faster"
    if fixed_bf16 is None and len(bf16_options) == 1:
        reason += "; bf16 not native on this device"
    return Numerics(
        precision if fixed_bf16 is not None else PRECISIONS[b],
        memory_format if fixed_cl is not None else FORMATS[c],
        {names[k]: round(v, 5) for k, v in seconds.items()},
        reason,
    )


def resolve(cfg, make_net: Callable[[], nn.Module] | None = None) -> Numerics | None:  # noqa: ANN001 (a DictConfig)
    """Replace ``auto`` in ``cfg.trainer.precision`` / ``cfg.model.memory_format`` by the choice; None if neither is auto.

    ``make_net`` builds the network to probe (default: ``cfg.generator``, instantiated). The choice is
    written into ``cfg`` (so it reaches the run's config, checkpoints and trackers) and into :data:`ENV`.
    """
    from hydra.utils import instantiate
    from omegaconf import open_dict

    precision, memory_format = str(cfg.trainer.get("precision", "32-true")), str(cfg.model.get("memory_format", "contiguous"))
    if "auto" not in (precision, memory_format):
        return None
    inherited = os.environ.get(ENV) if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 else None
    if inherited:
        numerics = Numerics(**json.loads(inherited))
        numerics = Numerics(
            numerics.precision if precision == "auto" else precision,
            numerics.memory_format if memory_format == "auto" else memory_format,
            numerics.seconds, "chosen by local rank 0",
        )
    else:
        make = make_net or (lambda: instantiate(cfg.generator)())
        numerics = choose(make, list(cfg.data.patch_size), training_device(cfg.trainer.get("accelerator", "auto")), precision, memory_format)
        os.environ[ENV] = json.dumps(asdict(numerics))
    with open_dict(cfg):
        cfg.trainer.precision = numerics.precision
        cfg.model.memory_format = numerics.memory_format
    log.info("numerics: %s", numerics.summary())
    return numerics
