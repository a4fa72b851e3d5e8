"""3D convolutions routed to the fast CPU kernels: drop-in subclasses of the torch layers.

Three shapes of our generators run far below the CPU's convolution ceiling with PyTorch's defaults
(the measurements are in the README, "Memory and speed"):

* **narrow outputs.** oneDNN blocks output channels by 16, so a Conv3d with one output channel costs as
  much as one with 16. The output heads are such convolutions at full resolution (ResNet: 7³, 64 -> 1;
  UNet: 3³ transposed, 32 -> 1). :func:`narrow_conv3d` computes the same convolution as a (1, 1, k_w)
  convolution into ``k_d * k_h * C_out`` channels followed by a sum of ``k_d * k_h`` shifted slices. The
  shifted sums are memory-bound, so this pays only for very narrow outputs: :func:`use_fast_convs`
  applies it to single-output layers.
* **small inputs.** PyTorch sends a batch-1 3D convolution with a kernel of at most 3 and
  ``C_in * D * H < 20480`` (e.g. 64 channels at 16³, or the 1-channel image at 64³) to its slower im2col
  ``slow_conv3d`` instead of oneDNN. :class:`FastConv3d` calls oneDNN's kernel directly (``aten.mkldnn_convolution``; same autograd
  formula, gradients identical).

* **narrow inputs.** The gradients of a convolution with one input channel run several times below the
  ceiling in oneDNN (the ResNet's 7³ stem: a tenth of the peer configuration's step). :class:`NarrowInputConv3d`
  keeps oneDNN's forward and computes both gradients as those of a (1, 1, k_w) convolution over the input
  unfolded along D and H into ``C_in * k_d * k_h`` channels (rebuilt in the backward, not kept), the input's
  by folding the unfolded gradient back with shifted sums.

One shape holds far more memory than it needs:

* **strided transposed convolutions without autograd.** PyTorch's CPU ``conv_transpose3d`` holds a buffer twice
  the size of its output (for a ResNet window, at the up stage to full resolution: the translation's peak).
  :class:`PhaseConvTranspose3d` computes each of the ``stride³`` output phases as a small convolution of the
  input and writes it into the output: nothing beyond the output and one phase. Only for large outputs: on
  small ones the torch kernel is faster.

Every layer takes its fast path only on CPU in float32 with oneDNN available, and defers to the parent
class otherwise (CUDA, other dtypes, strided narrow layers, ...). Parameters and state-dict keys are
those of the torch layers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mr2ct.nets.autocast_pad import AutocastPadConv3d

__all__ = ["narrow_conv3d", "FastConv3d", "NarrowInputConv3d", "NarrowConv3d", "NarrowConvTranspose3d", "PhaseConvTranspose3d", "use_fast_convs"]

#: oneDNN's output-channel block on AVX-512: narrower layers cost as much as this many channels
_BLOCK = 16
#: most channels the (D, H)-unfolded input of a :class:`NarrowInputConv3d` may have (a 1-channel 7³ conv: 49)
_UNFOLD_MAX = 64


def _cpu_fp32(x: Tensor) -> bool:
    # under torch.compile the compiler picks the kernels (fake tensors cannot enter oneDNN's op, and
    # inductor's conv lowering rejects padding wider than a kernel of 1)
    if torch.compiler.is_compiling():  # first: the checks below would break the compiled graph
        return False
    if torch.jit.is_tracing():  # an exported graph (TorchScript) holds the standard ops, not this machine's kernels
        return False
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
    )


class _ShiftSum(torch.autograd.Function):
    """(B, K_d, K_h, C, D + K_d - 1, H + K_h - 1, W) -> (B, C, D, H, W): sum over (a, b) of y[:, a, b, :, a:a+D, b:b+H].

    A hand-written backward: autograd's own would build one zero tensor the size of ``y`` per slice.
    """

    @staticmethod
    def forward(ctx, y: Tensor, d: int, h: int) -> Tensor:  # noqa: ANN001
        ctx.shape = y.shape
        kd, kh = y.shape[1], y.shape[2]
        out = y[:, 0, 0, :, :d, :h].contiguous()
        for a in range(kd):
            for b in range(kh):
                if a or b:
                    out.add_(y[:, a, b, :, a : a + d, b : b + h])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return _shift_sum_grad(grad, ctx.shape), None, None


def _shift_sum_grad(grad: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The gradient of :class:`_ShiftSum` for ``y`` of ``shape`` (B, K_d, K_h, C, D', H', W): ``grad`` at every shift."""
    gy = grad.new_zeros(shape)
    d, h = grad.shape[-3], grad.shape[-2]
    for a in range(shape[1]):
        for b in range(shape[2]):
            gy[:, a, b, :, a : a + d, b : b + h] = grad
    return gy


def _row_kernels(weight: Tensor) -> Tensor:
    """(C_out, C_in, k_d, k_h, k_w) -> (k_d * k_h * C_out, C_in, 1, 1, k_w): one (1, 1, k_w) kernel per row (a, b) and output."""
    c_out, c_in, kd, kh, kw = weight.shape
    return weight.permute(2, 3, 0, 1, 4).reshape(kd * kh * c_out, c_in, 1, 1, kw)


def narrow_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: tuple[int, int, int] = (0, 0, 0)) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=padding)`` (zero padding, stride 1, no dilation, one group) for small C_out.

    Args:
        x: (B, C_in, D, H, W) input.
        weight: (C_out, C_in, k_d, k_h, k_w).
        bias: (C_out,) or ``None``.
        padding: zero padding (p_d, p_h, p_w) on both sides.

    Returns:
        (B, C_out, D + 2p_d - k_d + 1, H + 2p_h - k_h + 1, W + 2p_w - k_w + 1), equal to ``F.conv3d`` up to
        float rounding.
    """
    c_out, c_in, kd, kh, kw = weight.shape
    # output channel (a * k_h + b) * C_out + o holds the k_w-wide partial sums of kernel row (a, b); the
    # (1, 1, k_w) kernel is pointwise along D and H, so zero-padding them there gives the zero rows the shifted
    # sums need without copying the (wide) input into a padded tensor
    y = F.conv3d(x, _row_kernels(weight), padding=padding)
    b_, _, dp, hp, wp = y.shape
    out = _ShiftSum.apply(y.view(b_, kd, kh, c_out, dp, hp, wp), dp - kd + 1, hp - kh + 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1, 1)


def _narrow_applies(layer: nn.Module, x: Tensor) -> bool:
    return (
        _cpu_fp32(x)
        and layer.out_channels < _BLOCK
        and layer.groups == 1
        and all(s == 1 for s in layer.stride)
        and all(d == 1 for d in layer.dilation)
        and not isinstance(layer.padding, str)
        and layer.kernel_size[0] * layer.kernel_size[1] > 1
    )


class FastConv3d(AutocastPadConv3d):
    """``nn.Conv3d`` that calls oneDNN directly on CPU in float32 (PyTorch's heuristic may pick ``slow_conv3d``)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not _cpu_fp32(x) or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        padding = list(self.padding)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = [0, 0, 0]
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, list(self.stride), list(self.dilation), self.groups)


def _unfold_dh(x: Tensor, kd: int, kh: int) -> Tensor:
    """(B, C, D', H', W) -> (B, C * k_d * k_h, D' - k_d + 1, H' - k_h + 1, W); channel (c * k_d + a) * k_h + b is x[:, c, a:, b:]."""
    d, h = x.shape[2] - kd + 1, x.shape[3] - kh + 1
    return torch.stack([x[:, :, a : a + d, b : b + h] for a in range(kd) for b in range(kh)], 2).flatten(1, 2)


class _NarrowInputConv(torch.autograd.Function):
    """Unpadded stride-1 conv: oneDNN's forward; both gradients through the (D, H)-unfolded input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        o, c, kd, kh, kw = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad
        grad = grad.contiguous()
        # the conv as a (1, 1, k_w) one over the input unfolded along D and H into C * k_d * k_h channels: oneDNN
        # runs its gradients several times faster than those of the C-channel 3D conv (README, "Narrow-input gradients")
        w_u = weight.reshape(o, c * kd * kh, 1, 1, kw)
        gx = gw = None
        if need_x or need_w:
            ones, zeros = [1, 1, 1], [0, 0, 0]
            g_u, gw, _ = torch.ops.aten.convolution_backward(
                grad, _unfold_dh(x.contiguous(), kd, kh), w_u, None, ones, zeros, ones, False, zeros, 1, [need_x, need_w, False])
            gw = gw.view(o, c, kd, kh, kw) if need_w else None
        if need_x:  # fold the unfolded input's gradient (B, C * k_d * k_h, D, H, W') back: shifted sums
            g_u = g_u.view(g_u.shape[0], c, kd, kh, *g_u.shape[2:])
            gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
            d, h = g_u.shape[-3], g_u.shape[-2]
            for a in range(kd):
                for b in range(kh):
                    gx[:, :, a : a + d, b : b + h] += g_u[:, :, a, b]
        gb = grad.sum((0, 2, 3, 4)) if need_b and ctx.has_bias else None
        return gx, gw, gb


class NarrowInputConv3d(FastConv3d):
    """:class:`FastConv3d` whose gradients come from the unfolded input when ``in_channels * k_d * k_h <= 64``
    (stride and dilation 1, one group, ``k_d * k_h > 1``); otherwise that of :class:`FastConv3d`."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not (_narrow_input_applies(self) and _cpu_fp32(x) and torch.is_grad_enabled()):
            return super()._conv_forward(x, weight, bias)
        x = F.pad(x, self._reversed_padding_repeated_twice, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        return _NarrowInputConv.apply(x, weight, bias)


def _narrow_input_applies(layer: nn.Conv3d) -> bool:
    kd, kh = layer.kernel_size[0], layer.kernel_size[1]
    return (
        layer.in_channels * kd * kh <= _UNFOLD_MAX and kd * kh > 1 and layer.groups == 1 and not isinstance(layer.padding, str)
        and all(s == 1 for s in layer.stride) and all(d == 1 for d in layer.dilation)
    )


class NarrowConv3d(AutocastPadConv3d):
    """``nn.Conv3d`` that runs :func:`narrow_conv3d` on CPU when ``out_channels < 16`` (stride/dilation 1, one group).

    With a replicate or reflect padding (the ResNet head's) it runs slab by slab along W (:class:`_PaddedNarrowConv`)
    without autograd, and under autograd when :attr:`w_slab` is set: less memory, a slower backward.
    """

    #: output columns per slab under autograd; None: the whole padded map at once (faster backward)
    w_slab: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not _narrow_applies(self, x):
            return super().forward(x)
        if self.padding_mode == "zeros":
            return narrow_conv3d(x, self.weight, self.bias, tuple(self.padding))
        if self.padding_mode in ("replicate", "reflect") and (self.w_slab or not torch.is_grad_enabled()):
            slab = self.w_slab or W_SLAB
            return _PaddedNarrowConv.apply(x, self.weight, self.bias, tuple(self.padding), self.padding_mode, slab)
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return narrow_conv3d(x, self.weight, self.bias)


#: output columns (last axis) per slab of :class:`_PaddedNarrowConv` without autograd
W_SLAB = 16


def _w_slabs(w_in: int, w_out: int, k: int, p: int, slab: int) -> list[tuple[int, int, int, int, int, int]]:
    """(o0, o1, lo, hi, p_left, p_right): output columns [o0, o1) read input columns [lo, hi) padded by p_left / p_right."""
    slabs = []
    for o0 in range(0, w_out, slab):
        o1 = min(w_out, o0 + slab)
        lo, hi = max(0, o0 - p), min(w_in, o1 - p + k - 1)
        slabs.append((o0, o1, lo, hi, lo - (o0 - p), (o1 - p + k - 1) - hi))
    return slabs


class _PaddedNarrowConv(torch.autograd.Function):
    """Replicate/reflect padding + :func:`narrow_conv3d`, slab by slab along W; only the unpadded input is kept.

    The padded map, the partial sums and their gradients (oneDNN's blocked copies included) exist for one
    slab of output columns at a time, never for the whole window: at the peer configuration's window they
    were the memory peak of a training step with the savers. The (1, 1, k_w)
    convolution reduces only W, so slabs along W recompute nothing but a halo copy of ``k_w - 1`` columns;
    the backward's smaller oneDNN calls and the padding rebuilt there cost time, hence only on request
    under autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int, int], mode: str, slab: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.mode, ctx.slab, ctx.has_bias = padding, mode, slab, bias is not None
        (pd, ph, pw), (_, _, kd, kh, kw) = padding, weight.shape
        b, _, d, h, w = x.shape
        out = x.new_empty(b, weight.shape[0], d + 2 * pd - kd + 1, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)
        for o0, o1, lo, hi, pl, pr in _w_slabs(w, out.shape[-1], kw, pw, slab):
            # channels-last: oneDNN reads it as it is, where a contiguous slab is first copied to its blocked layout
            xs = x[..., lo:hi].contiguous(memory_format=torch.channels_last_3d)
            out[..., o0:o1] = narrow_conv3d(F.pad(xs, (pl, pr, ph, ph, pd, pd), mode=mode), weight, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        (pd, ph, pw), mode = ctx.padding, ctx.mode
        c_out, c_in, kd, kh, kw = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w_u = _row_kernels(weight)
        gx = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None
        gw_u = torch.zeros_like(w_u) if need_w else None
        b, _, d, h, _ = grad.shape
        ones, zeros = [1, 1, 1], [0, 0, 0]
        for o0, o1, lo, hi, pl, pr in _w_slabs(x.shape[-1], grad.shape[-1], kw, pw, ctx.slab):
            with torch.enable_grad():  # the padding's own backward folds the padded gradient (any mode)
                xs = x[..., lo:hi].detach().contiguous().requires_grad_(need_x)
                xp = F.pad(xs, (pl, pr, ph, ph, pd, pd), mode=mode)
            gy = _shift_sum_grad(grad[..., o0:o1], (b, kd, kh, c_out, d + kd - 1, h + kh - 1, o1 - o0))
            g_xp, g_wu, _ = torch.ops.aten.convolution_backward(
                gy.view(b, kd * kh * c_out, *gy.shape[4:]), xp.detach(), w_u, None, ones, zeros, ones, False, zeros, 1,
                [need_x, need_w, False])
            del gy
            if need_w:
                gw_u += g_wu
            if need_x:
                gx[..., lo:hi] += torch.autograd.grad(xp, xs, g_xp)[0]
        gw = gw_u.view(kd, kh, c_out, c_in, kw).permute(2, 3, 0, 1, 4).contiguous() if need_w else None
        gb = grad.sum((0, 2, 3, 4)) if need_b and ctx.has_bias else None
        return gx, gw, gb, None, None, None


class NarrowConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` that runs :func:`narrow_conv3d` on CPU for stride 1 and ``out_channels < 16``.

    A stride-1 transposed convolution is the convolution with the flipped, in/out-swapped kernel over the input
    zero-padded by ``k - 1 - padding``.
    """

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        pad = tuple(k - 1 - p for k, p in zip(self.kernel_size, self.padding))
        if output_size is not None or any(self.output_padding) or min(pad) < 0 or not _narrow_applies(self, x):
            return super().forward(x, output_size)
        return narrow_conv3d(x, self.weight.flip(2, 3, 4).transpose(0, 1), self.bias, pad)


def _phase_taps(k: int, stride: int, padding: int, phase: int) -> tuple[list[int], int]:
    """Output positions ``stride * m + phase`` of a 1-D transposed convolution read inputs ``m + o`` for consecutive
    ``o`` from the returned first offset, through kernel taps in the returned order (empty: none reach the phase)."""
    taps = sorted(((phase + padding - j) // stride, j) for j in range(k) if (phase + padding - j) % stride == 0)
    return [j for _, j in taps], (taps[0][0] if taps else 0)


def _transposed_size(size: Sequence[int], stride: Sequence[int], padding: Sequence[int], kernel: Sequence[int],
                     output_padding: Sequence[int]) -> list[int]:
    """Per-axis output size of a transposed convolution (dilation 1)."""
    return [(n - 1) * s - 2 * p + k + op for n, s, p, k, op in zip(size, stride, padding, kernel, output_padding)]


def phase_conv_transpose3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
                           output_padding: tuple[int, ...]) -> Tensor:
    """``F.conv_transpose3d`` (one group, dilation 1) as ``prod(stride)`` convolutions, one per output phase.

    x: (B, C_in, D, H, W); weight: (C_in, C_out, k_d, k_h, k_w) -> (B, C_out, D', H', W') with
    D' = (D - 1) * s_d - 2 * p_d + k_d + op_d, in the input's memory format. Each phase (r_d, r_h, r_w) is the output's voxels
    ``[r_d::s_d, r_h::s_h, r_w::s_w]``: a plain convolution of the (cropped or zero-padded) input with the taps
    of ``weight`` that reach it, written straight into the output.
    """
    b, _, *size = x.shape
    out_size = _transposed_size(size, stride, padding, weight.shape[2:], output_padding)
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    y = torch.empty(b, weight.shape[1], *out_size, dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    w = weight.transpose(0, 1)
    for phase in itertools.product(*(range(s) for s in stride)):
        view = y[:, :, phase[0]::stride[0], phase[1]::stride[1], phase[2]::stride[2]]
        if view.numel() == 0:
            continue
        taps = [_phase_taps(k, s, p, r) for k, s, p, r in zip(weight.shape[2:], stride, padding, phase)]
        if any(not t for t, _ in taps):  # no kernel tap lands on this phase: only the bias does
            view.copy_(bias.view(1, -1, 1, 1, 1).expand_as(view) if bias is not None else torch.zeros_like(view))
            continue
        pads = []  # F.pad order (last axis first); negative pads crop
        for (t, first), n_in, n_out in zip(reversed(taps), reversed(size), reversed(view.shape[2:])):
            pads += [-first, (n_out - 1 + first + len(t) - 1) - (n_in - 1)]
        w_phase = w[:, :, taps[0][0]][:, :, :, taps[1][0]][:, :, :, :, taps[2][0]]
        xs = F.pad(x, pads)
        view.copy_(torch.ops.aten.mkldnn_convolution(xs, w_phase.contiguous(), bias, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1))
    return y


#: smallest output (bytes) that :class:`PhaseConvTranspose3d` computes by phases: below it the torch kernel is
#: faster (one call instead of ``prod(stride)`` small ones) and its buffer too small to set a peak
PHASE_MIN_BYTES = 16 << 20


class PhaseConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` that runs :func:`phase_conv_transpose3d` on CPU in float32 without autograd
    (translation, validation) for a strided layer with an output of at least :data:`PHASE_MIN_BYTES`; the torch
    layer otherwise (its backward is the faster one)."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if (output_size is not None or torch.is_grad_enabled() or not _cpu_fp32(x) or self.groups != 1
                or any(d != 1 for d in self.dilation) or all(s == 1 for s in self.stride) or self.padding_mode != "zeros"
                or self._output_bytes(x) < PHASE_MIN_BYTES):
            return super().forward(x, output_size)
        return phase_conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)

    def _output_bytes(self, x: Tensor) -> int:
        size = _transposed_size(x.shape[2:], self.stride, self.padding, self.kernel_size, self.output_padding)
        return x.shape[0] * self.out_channels * math.prod(size) * x.element_size()


def use_fast_convs(net: nn.Module, narrow_max_out: int = 1) -> nn.Module:
    """Swap the plain 3D convolution layers of ``net`` for the subclasses above, in place. Returns ``net``.

    ``nn.Conv3d``/``nn.ConvTranspose3d`` with at most ``narrow_max_out`` outputs become :class:`NarrowConv3d` /
    :class:`NarrowConvTranspose3d`; narrow-input ones :class:`NarrowInputConv3d`; every other ``nn.Conv3d``
    :class:`FastConv3d`, every other ``nn.ConvTranspose3d`` :class:`PhaseConvTranspose3d`. Parameters and state-dict keys are unchanged.
    """
    for m in net.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = NarrowConv3d if m.out_channels <= narrow_max_out else NarrowInputConv3d if _narrow_input_applies(m) else FastConv3d
        elif type(m) is nn.ConvTranspose3d:
            m.__class__ = NarrowConvTranspose3d if m.out_channels <= narrow_max_out else PhaseConvTranspose3d
    return net
