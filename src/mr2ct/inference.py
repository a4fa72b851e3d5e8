"""Whole-volume translation by sliding windows, shared by validation, translate and evaluate.

:func:`translate_array` is what ``python -m mr2ct.translate`` does to one volume: the training
preprocessing (:class:`Preprocessing`: orientation, spacing, intensity scaling), the windows, and the
inverse of the preprocessing on the way out. Memory is bounded by the window (``roi_size``) and ``sw_batch_size``, not by the volume: windows run on
``sw_device`` and are stitched with gaussian weights on ``device`` (MONAI's sliding_window_inference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, ScaleIntensityRangePercentiles, Spacing
from torch import nn

from mr2ct.data.transforms import hu_to_unit, unit_to_hu
from mr2ct.numerics import bf16_fast, fixed_mmap_threshold

log = logging.getLogger("mr2ct.inference")
#: what ``memory_format`` may say for a translation ("auto": :class:`LayoutChooser`)
WINDOW_FORMATS = ("contiguous", "channels_last", "auto")


def _check_format(memory_format: str) -> str:
    if memory_format not in WINDOW_FORMATS:
        raise ValueError(f"memory_format must be one of {WINDOW_FORMATS}, got {memory_format!r}")
    return memory_format


def _torch_format(layout: str) -> torch.memory_format:
    return torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format


def inference_numerics(
    run_config: dict[str, Any], device: torch.device, precision: str = "auto", memory_format: str = "auto", model_path: str | Path = ""
) -> tuple[str, str]:
    """(precision, memory format) for translating with a run's generator on ``device``.

    Precision ``auto`` takes what the run trained with (its resolved ``trainer.precision``), except bf16 where
    ``device`` has no native bf16 (emulated bf16 is far slower than fp32). Memory format ``auto`` stays ``auto``:
    :func:`translate_volume` times both layouts on the first windows (:class:`LayoutChooser`), since the
    layout that trains faster need not be the one that runs a forward pass faster. Deployable exports
    (``.onnx``, ``.pt``) run as exported: fp32, contiguous.
    """
    if Path(model_path).suffix in (".onnx", ".pt"):
        run_config, memory_format = {}, "contiguous"
    if precision == "auto":
        trained = str(run_config.get("trainer", {}).get("precision", "32-true"))
        precision = "bf16-mixed" if "bf16" in trained and bf16_fast(device) else "32-true"
    return precision, _check_format(memory_format)


def place_generator(generator: Callable[[torch.Tensor], torch.Tensor], device: torch.device, memory_format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A generator module moved to ``device`` in ``memory_format`` (``auto``: as it is; :func:`translate_volume`
    chooses); exported (non-module) generators as they are."""
    if not isinstance(generator, torch.nn.Module):
        return generator
    if memory_format == "auto":
        return generator.to(device)
    return generator.to(device, memory_format=_torch_format(memory_format))


@dataclass
class LayoutChooser:
    """Runs a generator's first windows with its weights in NCDHW, the next in NDHWC, then keeps the faster layout.

    The layout is the weights': oneDNN and cuDNN give a convolution's output the layout of its weights when the
    input has one channel, as an MRI window has. The module is converted in place, a parameter at a time, once
    (twice when contiguous wins), so it is never held twice. Of each layout's ``1 + rounds`` windows the first
    only warms up (kernel selection); channels-last is kept when its best time is at most ``margin`` of
    contiguous's. Every window's output is used: the choice costs no extra forward pass.
    """

    generator: nn.Module
    rounds: int = 2
    margin: float = 0.97
    seconds: dict[str, list[float]] = field(init=False, default_factory=lambda: {"contiguous": [], "channels_last": []})
    choice: str | None = field(init=False, default=None)
    calls: int = field(init=False, default=0)

    def _place(self, layout: str) -> None:
        self.generator.to(memory_format=_torch_format(layout))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice is not None:
            return self.generator(x)
        per_layout = 1 + self.rounds
        layout = "contiguous" if self.calls < per_layout else "channels_last"
        if self.calls in (0, per_layout):
            self._place(layout)
        self.calls += 1
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        y = self.generator(x)
        sync()
        if self.calls not in (1, per_layout + 1):
            self.seconds[layout].append(time.perf_counter() - t0)
        if len(self.seconds["channels_last"]) >= self.rounds:
            best = {k: min(v) for k, v in self.seconds.items()}
            self.choice = "channels_last" if best["channels_last"] <= self.margin * best["contiguous"] else "contiguous"
            if self.choice == "contiguous":
                self._place(self.choice)
            log.info("weights as %s (best of %d windows: contiguous %.0f ms, channels-last %.0f ms)", self.choice, self.rounds,
                     best["contiguous"] * 1e3, best["channels_last"] * 1e3)
        return y


def auto_sw_batch_size(
    generator: Callable[[torch.Tensor], torch.Tensor], roi_size: Sequence[int], device: torch.device, budget_fraction: float = 0.5, cap: int = 8
) -> int:
    """Windows per forward pass: 1 on CPU (one window already keeps the cores busy; more only costs memory);
    on CUDA as many as fit ``budget_fraction`` of the free memory, measured from one window's peak, at most ``cap``."""
    if device.type != "cuda":
        return 1
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        generator(torch.zeros(1, 1, *[int(r) for r in roi_size], device=device))
    per_window = max(1, torch.cuda.max_memory_allocated(device) - before)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(cap, budget_fraction * free // per_window)))


def translate_volume(
    generator: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int | str = 4,
    mode: str = "gaussian",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    precision: str = "32-true",
    memory_format: str = "contiguous",
) -> torch.Tensor:
    """Translate ``volume`` (B, C, X, Y, Z) in normalised units; returns float32 of the same shape, on ``device``.

    Volumes smaller than the window are padded inside MONAI and cropped back. ``precision`` bf16-mixed runs
    the windows under bf16 autocast; ``memory_format`` channels_last hands them to the network as NDHWC
    (for a network whose weights are NDHWC); ``auto`` converts a generator module to whichever layout
    :class:`LayoutChooser` times faster on the first windows; ``sw_batch_size="auto"``: :func:`auto_sw_batch_size`.
    """
    run_device = torch.device(sw_device) if sw_device is not None else volume.device
    bf16 = "bf16" in str(precision)
    channels_last = _check_format(memory_format) == "channels_last"
    network = LayoutChooser(generator) if memory_format == "auto" and isinstance(generator, nn.Module) else generator

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if bf16:  # no cast cache: it would keep a bf16 copy of every weight beside the fp32 one
            with torch.autocast(run_device.type, dtype=torch.bfloat16, cache_enabled=False):
                y = network(x)
        else:  # leave any enclosing autocast (Lightning's validation) as it is
            y = network(x)
        # MONAI weights the output in place; at one window per batch the window is a view of the input volume,
        # so an output sharing its storage (an identity-like network) would corrupt the input
        if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            y = y.clone()
        return y.float()

    with torch.inference_mode():
        if str(sw_batch_size) == "auto":
            sw_batch_size = auto_sw_batch_size(predictor, roi_size, run_device)
        return sliding_window_inference(
            volume,
            roi_size=[int(r) for r in roi_size],
            sw_batch_size=int(sw_batch_size),
            predictor=predictor,
            overlap=float(overlap),
            mode=mode,
            padding_mode="replicate",
            sw_device=sw_device,
            device=device,
            progress=progress,
        )


@dataclass
class Preprocessing:
    """What training did to a volume before the network saw it (read from the run's config)."""

    orientation: str = "RAS"
    spacing: Sequence[float] | None = None
    ct_window: Sequence[float] = (-1024.0, 3000.0)
    mri_percentiles: Sequence[float] = (0.5, 99.5)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], spacing: Any = "auto") -> Preprocessing:
        """``spacing="auto"``: resample as the training data module did (only NIfTI data resamples)."""
        data = run_config.get("data", {})
        if spacing == "auto":
            nifti = "Nifti" in str(data.get("_target_", ""))
            spacing = data.get("spacing") if nifti else None
        return cls(
            orientation=str(data.get("orientation", "RAS")),
            spacing=[float(s) for s in spacing] if spacing else None,
            ct_window=[float(w) for w in data.get("ct_window", (-1024.0, 3000.0))],
            mri_percentiles=[float(p) for p in data.get("mri_percentiles", (0.5, 99.5))],
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is available (use device=cpu)")
    return dev


def bound_cpu_heap(device: torch.device, enabled: bool = True) -> bool:
    """The tools' ``bounded_heap``: on CPU, :func:`mr2ct.numerics.fixed_mmap_threshold` for this process, so the
    windows' freed activations go back to the OS; whether it was set."""
    return device.type == "cpu" and bool(enabled) and fixed_mmap_threshold()


@torch.no_grad()
def translate_array(
    generator: nn.Module,
    volume: np.ndarray,
    affine: np.ndarray,
    prep: Preprocessing,
    roi_size: Sequence[int],
    direction: str = "a2b",
    overlap: float = 0.25,
    sw_batch_size: int | str = "auto",
    mode: str = "gaussian",
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "32-true",
    memory_format: str = "contiguous",
) -> np.ndarray:
    """Translate ``volume`` (X, Y, Z) in raw units (MRI, or CT in HU for ``b2a``) with its ``affine``.

    Returns float32 (X, Y, Z) in the input's voxel grid: HU for ``a2b``, normalised [-1, 1] for ``b2a``.
    ``precision`` / ``memory_format``: how the windows run (:func:`translate_volume`); a
    ``channels_last`` generator module is converted to NDHWC here.
    """
    spatial = [Orientation(axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if prep.spacing:
        spatial.append(Spacing(pixdim=prep.spacing, mode="bilinear"))
    spatial_xf = Compose(spatial)
    x = spatial_xf(MetaTensor(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None], affine=torch.as_tensor(affine, dtype=torch.float64)))
    raw = x.as_tensor()
    if direction == "a2b":
        lo, hi = prep.mri_percentiles
        net_in = ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=-1.0, b_max=1.0, clip=True)(raw)
    else:
        net_in = hu_to_unit(raw, prep.ct_window)
    net_in = torch.as_tensor(net_in, dtype=torch.float32)[None]  # (1, 1, X, Y, Z)
    # keep only what the inverse needs: whole-volume copies are what grows with the volume
    meta, ops = x.meta, x.applied_operations
    del x, raw
    device = torch.device(device)
    generator = place_generator(generator, device, memory_format)
    out = translate_volume(
        generator, net_in, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode, sw_device=device, device="cpu", progress=progress,
        precision=precision, memory_format=memory_format,
    )[0]
    del net_in
    if direction == "a2b":
        out = unit_to_hu(out, prep.ct_window)
    back = spatial_xf.inverse(MetaTensor(out, meta=meta, applied_operations=ops))
    del out
    return back.as_tensor()[0].numpy().astype(np.float32, copy=False)
