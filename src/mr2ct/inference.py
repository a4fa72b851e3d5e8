"""Whole-volume translation by sliding windows, shared by validation, translate and evaluate.

:func:`translate_array` is what ``python -m mr2ct.translate`` does to one volume: the training
preprocessing (:class:`Preprocessing`: orientation, spacing, intensity scaling), the windows, and the
inverse of the preprocessing on the way out. Memory is bounded by the window (``roi_size``) and ``sw_batch_size``, not by the volume: windows run on
``sw_device`` and are stitched with gaussian weights on ``device`` (MONAI's sliding_window_inference).
"""

from __future__ import annotations

import logging
import tempfile
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
#: what ``memory_format`` and ``precision`` may say for a translation ("auto": :class:`NumericsChooser` times them)
WINDOW_FORMATS = ("contiguous", "channels_last", "auto")
WINDOW_PRECISIONS = ("32-true", "bf16-mixed", "auto")


def _check_format(memory_format: str) -> str:
    if memory_format not in WINDOW_FORMATS:
        raise ValueError(f"memory_format must be one of {WINDOW_FORMATS}, got {memory_format!r}")
    return memory_format


def _torch_format(layout: str) -> torch.memory_format:
    return torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format


def inference_numerics(
    device: torch.device, precision: str = "auto", memory_format: str = "auto", model_path: str | Path = ""
) -> tuple[str, str]:
    """(precision, memory format) for translating with a generator on ``device``, whatever its run trained with.

    ``auto`` stays ``auto`` where there is a choice to time: :func:`translate_volume` runs the first windows under
    each candidate (:class:`NumericsChooser`) and keeps the fastest, since the numerics that train faster need not
    run a forward pass faster. Precision ``auto`` becomes fp32 where ``device`` has no native bf16 (emulated bf16
    is far slower). Deployable exports (``.onnx``, ``.pt``) run as exported: contiguous, and fp32 unless told.
    """
    if precision not in WINDOW_PRECISIONS:
        raise ValueError(f"precision must be one of {WINDOW_PRECISIONS}, got {precision!r}")
    _check_format(memory_format)
    if Path(model_path).suffix in (".onnx", ".pt"):
        memory_format = "contiguous"
        precision = "32-true" if precision == "auto" else precision
    if precision == "auto" and not bf16_fast(device):
        precision = "32-true"
    return precision, memory_format


def place_generator(generator: Callable[[torch.Tensor], torch.Tensor], device: torch.device, memory_format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A generator module moved to ``device`` in ``memory_format`` (``auto``: as it is; :func:`translate_volume`
    chooses); exported (non-module) generators as they are."""
    if not isinstance(generator, torch.nn.Module):
        return generator
    if memory_format == "auto":
        return generator.to(device)
    return generator.to(device, memory_format=_torch_format(memory_format))


@dataclass
class NumericsChooser:
    """Runs a generator's first windows under each candidate (precision, weights' layout), then keeps the fastest.

    Candidates are every pair of ``precisions`` x ``layouts``, the first pair the baseline; each runs ``1 + rounds``
    consecutive windows, of which the first only warms up (kernel selection). Another candidate is kept when its
    best window takes at most ``margin`` of the baseline's best and no candidate is faster. Every window's output
    is used: the choice costs no extra forward pass.

    The layout is the weights': oneDNN and cuDNN give a convolution's output the layout of its weights when the
    input has one channel, as an MRI window has. The module is converted in place, a parameter at a time, so it is
    never held twice. bf16 windows run under autocast with the convolutions' weights stored in bf16 (what autocast
    would cast them to on every call, so the same numbers at half the weights' memory); their fp32 values wait in
    a temporary file meanwhile, and :meth:`restore` puts them back exactly. fp32 leaves any enclosing autocast
    (Lightning's validation) as it is.
    """

    generator: nn.Module  # or any callable, with one layout
    precisions: Sequence[str] = ("32-true",)
    layouts: Sequence[str] = ("contiguous", "channels_last")
    rounds: int = 2
    margin: float = 0.97
    seconds: dict[tuple[str, str], list[float]] = field(init=False)
    choice: tuple[str, str] | None = field(init=False, default=None)
    calls: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.candidates = [(p, fmt) for p in self.precisions for fmt in self.layouts]
        self.seconds = {c: [] for c in self.candidates}
        self._layout: str | None = None  # None: as the module came
        self._spill: Any = None  # the fp32 conv weights while they are bf16
        if len(self.candidates) == 1:
            self.choice = self.candidates[0]

    def _conv_params(self) -> list[nn.Parameter]:
        convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        return [p for m in self.generator.modules() if isinstance(m, convs) for p in m.parameters(recurse=False)]

    def _weights_in(self, precision: str) -> None:
        bf16 = "bf16" in precision
        if not isinstance(self.generator, nn.Module) or bf16 == (self._spill is not None):
            return
        params = self._conv_params()
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: the module may train again
            if bf16:
                self._spill = tempfile.TemporaryFile()
                torch.save([p.data for p in params], self._spill)
                for p in params:
                    p.data = p.data.to(torch.bfloat16)
            else:
                self._spill.seek(0)
                saved = torch.load(self._spill, map_location=lambda storage, _: storage, weights_only=True)
                for p, w in zip(params, saved, strict=True):
                    p.data = w.to(p.device)
                self._spill.close()
                self._spill = None

    def restore(self) -> None:
        """Put back the fp32 weights of the convolutions (exactly as they came) if bf16 windows left them in bf16."""
        self._weights_in("32-true")

    def _place(self, layout: str) -> None:
        if layout != self._layout and len(self.layouts) > 1:
            self.generator.to(memory_format=_torch_format(layout))
            self._layout = layout

    def _run(self, x: torch.Tensor, candidate: tuple[str, str]) -> torch.Tensor:
        precision, layout = candidate
        self._weights_in(precision)
        self._place(layout)
        if "bf16" in precision:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
                return self.generator(x)
        return self.generator(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice is not None:
            return self._run(x, self.choice)
        per = 1 + self.rounds
        candidate = self.candidates[self.calls // per]
        timed = self.calls % per != 0
        self.calls += 1
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        y = self._run(x, candidate)
        sync()
        if timed:
            self.seconds[candidate].append(time.perf_counter() - t0)
        if self.calls == per * len(self.candidates):
            best = {c: min(t) for c, t in self.seconds.items()}
            base = self.candidates[0]
            fastest = min(self.candidates, key=best.__getitem__)
            self.choice = fastest if best[fastest] <= self.margin * best[base] else base
            self._place(self.choice[1])
            log.info("windows in %s, weights as %s (best of %d windows: %s)", self.choice[0], self.choice[1], self.rounds,
                     ", ".join(f"{p}/{fmt} {best[(p, fmt)] * 1e3:.0f} ms" for p, fmt in self.candidates))
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
    (for a network whose weights are NDHWC). ``auto`` in either times the candidates on the first windows and
    keeps the fastest (:class:`NumericsChooser`; precision ``auto`` on a device without native bf16: see
    :func:`inference_numerics`); ``sw_batch_size="auto"``: :func:`auto_sw_batch_size`.
    """
    run_device = torch.device(sw_device) if sw_device is not None else volume.device
    _check_format(memory_format)
    channels_last = memory_format == "channels_last"
    module = isinstance(generator, nn.Module)  # an exported callable runs as it is: one candidate
    precisions = ("32-true", "bf16-mixed") if precision == "auto" and module else ("32-true" if precision == "auto" else str(precision),)
    layouts = ("contiguous", "channels_last") if memory_format == "auto" and module else ("contiguous" if memory_format == "auto" else memory_format,)
    network = NumericsChooser(generator, precisions, layouts)  # type: ignore[arg-type]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = network(x)
        # MONAI weights the output in place; at one window per batch the window is a view of the input volume,
        # so an output sharing its storage (an identity-like network) would corrupt the input
        if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            y = y.clone()
        return y.float()

    with torch.inference_mode():
        try:
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
        finally:
            network.restore()


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
