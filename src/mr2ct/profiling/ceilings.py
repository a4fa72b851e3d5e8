"""This machine's ceilings: GFLOP/s of a Conv3d (forward, forward+backward, NCDHW and channels-last, fp32/bf16)
and of a matmul, medians after warm-up; the yardstick of MFU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


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
