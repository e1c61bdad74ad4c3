"""Layer-wise least squares (PLeaS, Nasery et al., CVPR 2025): each merged conv/linear layer is solved, from
the input towards the output, so that on the merged network's own inputs it reproduces the (aligned)
sources' features of that layer, weighted by ``ratio``.

Layer ``l`` of the merged model sees ``X`` (its input in the merged model, layers before ``l`` already
solved); source ``i`` produces ``Z_i`` (layer ``l``'s output in source ``i``, on source ``i``'s own input).
The merged weight minimises ``sum_i r_i ||W X - Z_i||^2 + ridge * mean(diag(X X^T)) * ||W||^2``, i.e. a ridge
regression of the weighted mean target ``sum_i r_i Z_i`` on ``X``; only ``X X^T``, ``Z X^T`` and ``||Z||^2``
are accumulated (float64), so the images pass in batches.

- conv: the input unfolded into patches (every output position is a sample; timm's ``Conv2dSame`` padded
  first); a grouped conv is solved group by group, a depthwise conv channel by channel (each output channel
  reads only its own group's inputs, as in the network);
- linear: every leading index (image, token) is a sample;
- BatchNorm right after a conv/linear layer: the pair is solved as one affine map (target: the sources'
  BatchNorm outputs, before any activation), its intercept put into the BatchNorm: the merged BatchNorm gets
  the merged layer's output mean and variance on the fitted images as running statistics, and the scale and
  shift that make it compute ``W x + b`` with them (so recalibrating it on those images changes ~nothing);
- a conv/linear with a bias and no BatchNorm: the intercept is the bias; with neither, no intercept.

Any other module with parameters (LayerNorm, GroupNorm, a BatchNorm not right after a layer, PReLU...) is
refused with a one-line error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BN = nn.modules.batchnorm._BatchNorm


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


@dataclass
class LayerFit:
    """The fit of one layer: the relative error ``||W X - Z||^2 / ||Z||^2`` of the solved layer, and of the
    starting (permutation-only) merge's layer on the same merged inputs, both on the fitted images."""

    name: str
    error: float
    start_error: float
    samples: int = 0  # positions x images the layer was fitted on
    features: int = 0  # inputs per output unit (with the intercept)


def _conv_same_padding(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv2dSame"


def _check_layer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"pleas: layer '{name}' (Conv2d with padding {module.padding!r}, "
                             f"{module.padding_mode}) is not supported")
        return
    raise ValueError(f"pleas: layer '{name}' ({type(module).__name__}) is not supported "
                     "(conv2d, linear and a BatchNorm right after one are)")


def layer_plan(model: nn.Module, example: Tensor, skip: Sequence[str] = ()) -> list[tuple[str, str | None]]:
    """The conv/linear layers of ``model`` in the order they run on ``example``, each with the BatchNorm that
    directly reads its output (or None). Modules under ``skip`` (the head) are left out.

    Raises ``ValueError`` naming a module with parameters that is neither (see the module doc).
    """
    order: list[str] = []
    outputs: dict[int, tuple[str, Tensor]] = {}  # kept alive: an id is unique only while its tensor lives
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    modules = {n: m for n, m in model.named_modules()
               if n and not any(n == s or n.startswith(s + ".") for s in skip)
               and any(True for _ in m.parameters(recurse=False))}

    def hook(m: nn.Module, args: tuple, out: Tensor, name: str) -> None:
        calls[name] = calls.get(name, 0) + 1
        if isinstance(m, _BN):
            source, tensor = outputs.get(id(args[0]), (None, None))
            if source is None or tensor is not args[0]:
                raise ValueError(f"pleas: layer '{name}' ({type(m).__name__}) does not directly follow a "
                                 "conv/linear layer: not supported")
            pairs[source] = name
            return
        _check_layer(name, m)
        order.append(name)
        outputs[id(out)] = (name, out)

    handles = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in modules.items()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    shared = [n for n, c in calls.items() if c > 1]
    if shared:
        raise ValueError(f"pleas: layer '{shared[0]}' is called more than once (shared weights): not supported")
    missing = [n for n in modules if n not in calls]
    if missing:
        raise ValueError(f"pleas: layer '{missing[0]}' has parameters but never runs: not supported")
    return [(name, pairs.get(name)) for name in order]


def _design(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as ``(groups, samples, features)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if _conv_same_padding(module):
        from timm.layers import pad_same

        x = pad_same(x, list(module.weight.shape[-2:]), list(module.stride), list(module.dilation))
        padding = 0
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    g = module.groups
    b, d, p = cols.shape
    return cols.view(b, g, d // g, p).permute(1, 0, 3, 2).reshape(g, b * p, d // g)


def _target(module: nn.Module, out: Tensor, groups: int) -> Tensor:
    """The layer's output as ``(groups, samples, outputs per group)``."""
    if isinstance(module, nn.Linear):
        return out.reshape(1, -1, out.shape[-1])
    b, c = out.shape[:2]
    return out.reshape(b, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)


def _bn_affine(bn: nn.Module | None, like: Tensor) -> tuple[Tensor, Tensor] | None:
    """The eval-mode BatchNorm as ``y = scale * x + shift`` (None without one)."""
    if bn is None:
        return None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@dataclass
class _Moments:
    xx: Tensor  # (G, D+1, D+1): the last feature is the constant 1
    zx: Tensor  # (G, O, D+1)
    zz: float
    count: int


def _accumulate(moments: _Moments | None, x: Tensor, z: Tensor) -> _Moments:
    x, z = x.double(), z.double()
    ones = torch.ones(*x.shape[:2], 1, dtype=x.dtype, device=x.device)
    xt = torch.cat([x, ones], dim=2)
    xx = xt.transpose(1, 2) @ xt
    zx = z.transpose(1, 2) @ xt
    zz = float(z.double().square().sum())
    if moments is None:
        return _Moments(xx, zx, zz, x.shape[1])
    moments.xx += xx
    moments.zx += zx
    moments.zz += zz
    moments.count += x.shape[1]
    return moments


def _error(w: Tensor, m: _Moments) -> float:
    """``||W X - Z||^2 / ||Z||^2`` from the moments (``w``: (G, O, D+1))."""
    quad = torch.einsum("god,gde,goe->", w, m.xx, w)
    cross = torch.einsum("god,god->", w, m.zx)
    return float((quad - 2 * cross + m.zz) / max(m.zz, 1e-300))


def _solve(m: _Moments, ridge: float, intercept: bool) -> Tensor:
    xx, zx = m.xx, m.zx
    if not intercept:
        xx, zx = xx[:, :-1, :-1], zx[:, :, :-1]
    d = xx.shape[-1]
    scale = torch.diagonal(xx, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=xx.dtype, device=xx.device)
    w = torch.linalg.solve(xx + ridge * scale[:, None, None] * eye, zx.transpose(1, 2)).transpose(1, 2)
    if not intercept:
        w = torch.cat([w, torch.zeros(*w.shape[:2], 1, dtype=w.dtype, device=w.device)], dim=2)
    return w


def _current_affine(layer: nn.Module, bn: nn.Module | None) -> Tensor:
    """The layer (+ its BatchNorm) as ``(G, O, D+1)`` weights with the intercept last."""
    g = 1 if isinstance(layer, nn.Linear) else layer.groups
    out = layer.weight.shape[0]
    w = layer.weight.detach().double().reshape(g, out // g, -1)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(out, dtype=w.dtype,
                                                                                     device=w.device)
    if bn is not None:
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
        shift = (bn.bias - bn.running_mean * (bn.weight / torch.sqrt(bn.running_var + bn.eps))).detach().double()
        w = w * scale.reshape(g, out // g, 1)
        bias = bias * scale + shift
    return torch.cat([w, bias.reshape(g, out // g, 1)], dim=2)


@torch.no_grad()
def _set_layer(layer: nn.Module, bn: nn.Module | None, w: Tensor, m: _Moments) -> None:
    out = layer.weight.shape[0]
    weight, bias = w[:, :, :-1], w[:, :, -1].reshape(out)
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight))
    if bn is None:
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias))
        return
    if layer.bias is not None:
        layer.bias.zero_()
    # the merged layer's output statistics on the fitted inputs: mean and variance of W x per channel
    mean_x = m.xx[:, -1, :-1] / m.count  # (G, D)
    second = m.xx[:, :-1, :-1] / m.count
    mu = torch.einsum("god,gd->go", weight, mean_x).reshape(out)
    var = (torch.einsum("god,gde,goe->go", weight, second, weight).reshape(out) - mu * mu).clamp_min(0)
    bn.running_mean.copy_(mu.to(bn.running_mean))
    bn.running_var.copy_(var.to(bn.running_var))
    bn.weight.copy_(torch.sqrt(var + bn.eps).to(bn.weight))
    bn.bias.copy_((mu + bias).to(bn.bias))


def _capture(model: nn.Module, name: str, want_input: bool, inputs: Iterable[Tensor]) -> Iterable[Tensor]:
    """For each batch, module ``name``'s input (or output), the forward stopped right after it."""
    module = dict(model.named_modules())[name]
    box: list[Tensor] = []

    def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
        box.append(args[0] if want_input else out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for x in inputs:
            try:
                model(x)
            except _Stop:
                pass
            yield box.pop()
    finally:
        handle.remove()


@torch.no_grad()
def least_squares_merge(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    inputs: Callable[[], Iterable[Tensor]],
    ratio: Sequence[float],
    ridge: float = 1e-4,
    skip: Sequence[str] = (),
    on_layer: Callable[[LayerFit], None] | None = None,
) -> list[LayerFit]:
    """Solve every conv/linear layer of ``merged`` (in place, from the input on) so that it reproduces the
    ``ratio``-weighted features of ``sources`` (aligned onto it already; same architecture, eval mode) on
    ``inputs()`` (a fresh iterator of model-ready batches per call, e.g. target training images).

    ``merged`` starts as the permutation-only merge (its layers give each fit's ``start_error``; all are
    replaced). Modules under ``skip`` (the head) are left alone. Returns each layer's :class:`LayerFit`.
    """
    example = next(iter(inputs()))
    plan = layer_plan(merged, example[:1], skip)
    merged.eval()
    for s in sources:
        s.eval()
    modules = dict(merged.named_modules())
    source_modules = [dict(s.named_modules()) for s in sources]
    fits = []
    for name, bn_name in plan:
        layer = modules[name]
        groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        moments = None
        streams = [_capture(merged, name, True, inputs())] + [
            _capture(s, name, False, inputs()) for s in sources]
        for x, *outs in zip(*streams, strict=True):
            design = _design(layer, x)
            target = None
            for r, out, mods in zip(ratio, outs, source_modules, strict=True):
                cz = _target(layer, out, groups)
                affine = _bn_affine(mods[bn_name] if bn_name else None, out)
                if affine is not None:
                    cz = cz * affine[0].reshape(groups, 1, -1) + affine[1].reshape(groups, 1, -1)
                target = r * cz if target is None else target + r * cz
            moments = _accumulate(moments, design, target)
        bn = modules[bn_name] if bn_name else None
        has_intercept = bn is not None or layer.bias is not None
        start = _current_affine(layer, bn).to(moments.xx)
        if not has_intercept:
            start[:, :, -1] = 0
        w = _solve(moments, ridge, has_intercept)
        fit = LayerFit(name, _error(w, moments), _error(start, moments), moments.count, moments.xx.shape[-1])
        _set_layer(layer, bn, w, moments)
        fits.append(fit)
        if on_layer is not None:
            on_layer(fit)
    return fits
