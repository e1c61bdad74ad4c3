"""``device.cpu_depthwise_grad: taps``: small-map depthwise convolutions' weight gradient summed tap by tap
equals the library's, and only those convolutions take it."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F

from medmerge.depthwise import MAX_OUTPUT_POSITIONS, DepthwiseConv2d, SmallMapDepthwise, small_map_depthwise
from medmerge.device import Runtime


def _pair(value):
    return value if isinstance(value, tuple) else (value, value)


def _grads(fn, *tensors):
    out = fn(*tensors)
    return torch.autograd.grad(out, tensors, torch.randn_like(out, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("size, kernel, stride, padding, dilation, channels_last", [
    (2, 5, 1, 2, 1, False),   # the default model's last stages: every tap but the centre 3x3 sees padding only
    (4, 5, 1, 2, 1, True),
    (7, 5, 2, 0, 1, True),    # timm's "same" padding: padded input, stride 2, no padding
    (4, 3, 1, 1, 1, False),
    (5, 3, 1, 2, 2, True),    # dilated
    (3, (3, 1), (2, 1), (1, 0), 1, False),  # a non-square kernel, stride and padding
])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_librarys(size, kernel, stride, padding, dilation, channels_last, bias):
    torch.manual_seed(0)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(3, 6, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, kh, kw, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    layout = torch.channels_last if channels_last else torch.contiguous_format
    xs, ws = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)
    tensors = (xs, ws) if b is None else (xs, ws, b)

    def library(x, w, b=None):
        return F.conv2d(x, w, b, stride, padding, dilation, 6)

    def taps(x, w, b=None):
        return DepthwiseConv2d.apply(x, w, b, _pair(stride), _pair(padding), _pair(dilation))

    assert torch.equal(library(*tensors), taps(*tensors))  # the forward pass is the library's
    for expected, got in zip(_grads(library, *tensors), _grads(taps, *tensors), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(taps, tensors)


def _routed(x, w, **conv):
    """Whether ``F.conv2d`` under the mode took the tap-by-tap weight gradient."""
    with SmallMapDepthwise():
        out = F.conv2d(x, w, **conv)
    return type(out.grad_fn).__name__ == "DepthwiseConv2dBackward"


def test_only_small_map_depthwise_convolutions_with_a_learning_kernel_are_routed():
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 8, 8)
    kernel = torch.randn(8, 1, 3, 3, requires_grad=True)
    assert _routed(small, kernel, padding=1, groups=8)
    assert _routed(large, kernel, stride=2, padding=1, groups=8)  # 8x8 in, 4x4 out
    assert not _routed(large, kernel, padding=1, groups=8)  # 64 outputs
    assert 64 > MAX_OUTPUT_POSITIONS
    assert not _routed(small, kernel.detach(), padding=1, groups=8)  # a frozen kernel: nothing to gain
    assert not _routed(small, kernel, padding="same", groups=8)
    assert not _routed(small, torch.randn(8, 8, 3, 3, requires_grad=True), padding=1)  # a dense convolution
    assert not _routed(small, torch.randn(8, 2, 3, 3, requires_grad=True), padding=1, groups=4)  # grouped
    assert small_map_depthwise(small, kernel, None, 1, 1, 1, 8) is not None
    assert small_map_depthwise(small, kernel, None, 1, 1, 1, 1) is None


def test_a_timm_models_gradients_are_the_same_under_the_mode():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    grads = []
    for mode in (contextlib.nullcontext(), SmallMapDepthwise()):
        model.zero_grad()
        with mode:
            F.cross_entropy(model(x), labels).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    routed = [name for name, p in model.named_parameters() if p.dim() == 4 and p.shape[1] == 1]
    assert len(routed) > 10
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-10, atol=1e-12, msg=name)


def test_runtime_enters_the_mode_only_where_asked():
    cpu = torch.device("cpu")
    assert isinstance(Runtime(cpu, depthwise_taps=True).training_ops(), SmallMapDepthwise)
    assert not isinstance(Runtime(cpu).training_ops(), SmallMapDepthwise)
    assert not isinstance(Runtime(cpu, depthwise_taps=True, compile=True).training_ops(), SmallMapDepthwise)

