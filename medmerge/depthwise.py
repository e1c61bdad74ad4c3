"""Depthwise convolutions' weight gradient on small maps, tap by tap (``device.cpu_depthwise_grad: taps``).

On the CPU, oneDNN computes the weight gradient of a depthwise convolution whose output map is tiny (the
last stages of an EfficientNet or MobileNet at 64 px: 2×2 and 4×4 maps, 480 to 1152 channels) in 10 to 30 ms,
about a hundred times what its few multiply-adds need; in the default model those few layers took a third of
every training step (AMD EPYC Zen 4, AVX2 kernels, 1 thread: ``benchmarks/README.md``, "Depthwise weight
gradients"). Summing one ``input window × output gradient`` product per kernel tap gives the same gradient
(equal to float64 rounding) in a tenth of the time. :class:`SmallMapDepthwise` routes such convolutions
through :class:`DepthwiseConv2d` while it is active; the forward pass and the input's gradient stay the
library's, and every other convolution is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: a depthwise convolution whose output map has at most this many positions (4×4) takes the tap-by-tap weight
#: gradient; at 8×8 both took the same time in the measurement above, and beyond it the library is faster
MAX_OUTPUT_POSITIONS = 16

Pair = tuple[int, int]


def _pair(value: int | tuple[int, ...] | list[int]) -> Pair:
    return (value[0], value[-1]) if isinstance(value, (tuple, list)) else (value, value)


def output_size(size: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """The output map's height and width of a convolution over a ``size`` map."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True))


def depthwise_weight_grad(x: Tensor, grad: Tensor, kernel: Pair, stride: Pair, padding: Pair,
                          dilation: Pair) -> Tensor:
    """The gradient of a depthwise kernel (``channels × 1 × kh × kw``): for each tap, the sum over the batch
    and the output map of the input window it sees times the output's gradient. Taps that see only padding
    get zero without a product."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    height, width = x.shape[2:]
    out_h, out_w = grad.shape[2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    weight_grad = x.new_zeros(x.shape[1], kh, kw)
    for i in range(kh):
        top = i * dh
        if top + (out_h - 1) * sh < ph or top >= ph + height:  # every row this tap sees is padding
            continue
        for j in range(kw):
            left = j * dw
            if left + (out_w - 1) * sw < pw or left >= pw + width:
                continue
            window = padded[:, :, top:top + (out_h - 1) * sh + 1:sh, left:left + (out_w - 1) * sw + 1:sw]
            weight_grad[:, i, j] = (window * grad).sum((0, 2, 3))
    return weight_grad.unsqueeze(1)


class DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=channels)`` whose weight gradient is
    :func:`depthwise_weight_grad`; the forward pass and the input's gradient are the library's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
                dilation: Pair) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        input_grad = weight_grad = bias_grad = None
        if ctx.needs_input_grad[0]:
            input_grad = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            weight_grad = depthwise_weight_grad(x, grad, tuple(weight.shape[2:]), stride, padding, dilation
                                                ).contiguous(memory_format=layout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            bias_grad = grad.sum((0, 2, 3))
        return input_grad, weight_grad, bias_grad, None, None, None


def depthwise_arguments(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                        dilation=1, groups: int = 1) -> tuple | None:
    """``F.conv2d``'s arguments as :class:`DepthwiseConv2d` takes them (stride, padding and dilation as pairs)
    for a depthwise convolution (one kernel per channel, numeric padding); ``None`` for any other."""
    if (isinstance(padding, str) or input.dim() != 4 or groups == 1 or groups != input.shape[1]
            or weight.shape[0] != groups or weight.shape[1] != 1):
        return None
    return input, weight, bias, _pair(stride), _pair(padding), _pair(dilation)


def small_map_depthwise(*args, **kwargs) -> tuple | None:
    """:func:`depthwise_arguments` of a depthwise convolution on the CPU whose kernel learns and whose output
    has at most :data:`MAX_OUTPUT_POSITIONS` positions; ``None`` for any other convolution."""
    call = depthwise_arguments(*args, **kwargs)
    if call is None:
        return None
    input, weight, _, stride, padding, dilation = call
    if input.device.type != "cpu" or not weight.requires_grad:
        return None
    out_h, out_w = output_size(tuple(input.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    return call if out_h * out_w <= MAX_OUTPUT_POSITIONS else None


class SmallMapDepthwise(TorchFunctionMode):
    """While active, the depthwise convolutions that :func:`small_map_depthwise` accepts run as
    :class:`DepthwiseConv2d`; every other call is passed on as it was made."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:  # torch.conv2d is the same function
            call = small_map_depthwise(*args, **kwargs)
            if call is not None:
                return DepthwiseConv2d.apply(*call)
        return func(*args, **kwargs)
