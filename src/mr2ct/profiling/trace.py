"""The training step on the meta device: exact FLOPs and the peak of live tensor bytes, instant at any size."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from mr2ct.model.step import cyclegan_step, plain_hooks
from mr2ct.profiling.ceilings import count_flops


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
    """One CycleGAN training step without a Trainer: :func:`mr2ct.model.step.cyclegan_step`, the step
    ``CycleGAN.training_step`` runs, with plain PyTorch hooks."""
    opt_g, opt_d = opts
    cyclegan_step(model, opt_g, opt_d, {"a": real_a, "b": real_b}, plain_hooks(opts))


def optimizers(model: Any) -> list[torch.optim.Optimizer]:
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
    ``flops`` of the step, ``weights`` (parameters and buffers: one more copy with ``callbacks.ema``) and ``batch_voxels`` (batch size x patch voxels). ``half_precision`` traces with the model and patches in bf16 (only ``act``
    is meaningful then: mixed precision keeps fp32 weights, gradients and optimizer states).
    """
    model = build_model(cfg, "meta")
    for g in (model.g_ab, model.g_ba):
        g._compiled_call_impl = None  # no compilation on shape-only tensors
    dtype = torch.bfloat16 if half_precision else torch.float32
    model.to(dtype)
    batch, patch = int(cfg.data.batch_size), list(cfg.data.patch_size)
    data = {k: v.to(dtype) for k, v in random_batch(batch, patch, "meta").items()}
    opts = optimizers(model)
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
        "weights": _nbytes([*model.parameters(), *model.buffers()]),
        "pool": 2 * int(cfg.model.pool_size) * voxels * torch.finfo(dtype).bits // 8, "flops": flops,
        "batch_voxels": batch * voxels,
    }
