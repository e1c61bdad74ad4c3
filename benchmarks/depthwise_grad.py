"""Depthwise weight gradients on the CPU: the library's kernel against the tap-by-tap sum, per layer and per step.

For each depthwise convolution of the model (at ``--size`` px, batch ``--batch``, channels_last) the weight
gradient's time as oneDNN computes it (``aten.convolution_backward``) and as ``medmerge.depthwise`` does,
and whether ``device.cpu_depthwise_grad: taps`` routes it; then one training step (forward, backward,
AdamW) with ``library`` and with ``taps``, alternating, and the largest relative difference between the
two steps' gradients. Usage:

    python -m benchmarks depthwise_grad                                 # the default model, 64 px, batch 32
    python -m benchmarks depthwise_grad --kernels native --threads 2

Run it on an otherwise idle machine: the header prints the CPU and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def record_depthwise_calls(model, images) -> list[tuple]:
    """Every depthwise ``F.conv2d`` call of one forward pass, as it was made (timm's "same" padding pads the
    input first): input, kernel, stride, padding, dilation, output."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from medmerge.depthwise import depthwise_arguments

    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            call = depthwise_arguments(*args, **(kwargs or {})) if func is F.conv2d else None
            if call is not None:
                x, weight, _, stride, padding, dilation = call
                calls.append((x.detach(), weight, stride, padding, dilation, out.detach()))
            return out

    with torch.no_grad(), Record():
        model(images)
    return calls


def layer_times(x, weight, stride, padding, dilation, out, repeats: int) -> tuple[float, float]:
    """Median ms of one depthwise weight gradient: the library's, then the tap-by-tap sum."""
    import torch

    from medmerge.depthwise import depthwise_weight_grad
    grad = torch.randn_like(out)
    library = median_ms(lambda: torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
        [False, True, False]), repeats)
    taps = median_ms(lambda: depthwise_weight_grad(x, grad, tuple(weight.shape[2:]), stride, padding, dilation),
                     repeats)
    return library, taps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks depthwise_grad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kernels", choices=("portable", "native"), default="portable")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    from medmerge.device import cpu_description, hold_cpu_kernels
    compute = hold_cpu_kernels(args.kernels, args.threads)  # before the first tensor operation
    import torch
    import torch.nn.functional as F

    from medmerge.depthwise import small_map_depthwise
    from medmerge.device import Runtime
    from medmerge.models import create_model

    print(f"{cpu_description()}; {compute}; {args.arch} at {args.size} px, batch {args.batch}, channels_last; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=4).to(memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (args.batch,))

    calls = record_depthwise_calls(model, images)
    print("| layer input | kernel, stride | output | library (ms) | taps (ms) | routed |")
    print("|---|---|---|---:|---:|---|")
    library_total = taps_total = 0.0
    for x, weight, stride, padding, dilation, out in calls:
        library, taps = layer_times(x, weight, stride, padding, dilation, out, args.repeats)
        routed = small_map_depthwise(x, weight, None, stride, padding, dilation, x.shape[1]) is not None
        if routed:
            library_total, taps_total = library_total + library, taps_total + taps
        print(f"| {list(x.shape)} | {weight.shape[2]}×{weight.shape[3]}, {stride[0]} | {out.shape[2]}×{out.shape[3]} "
              f"| {library:.2f} | {taps:.2f} | {'yes' if routed else 'no'} |")
    print(f"\nrouted layers, one pass: library {library_total:.1f} ms, taps {taps_total:.1f} ms\n")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runtimes = {"library": Runtime(torch.device("cpu")), "taps": Runtime(torch.device("cpu"), depthwise_taps=True)}

    def step(runtime: Runtime) -> None:
        optimizer.zero_grad(set_to_none=True)
        with runtime.training_ops():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()

    grads = {}
    for name, runtime in runtimes.items():
        step(runtime)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    difference = max(((a - b).norm() / a.norm().clamp_min(1e-30)).item()
                     for a, b in zip(grads["library"], grads["taps"], strict=True))
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(3):  # alternate the variants so that a drifting machine speed hits both alike
        for name, runtime in runtimes.items():
            times[name].append(median_ms(lambda r=runtime: (step(r), optimizer.step()), max(args.repeats // 3, 1)))
    library, taps = (statistics.median(times[name]) for name in runtimes)
    print("| training step | library (ms) | taps (ms) | library ÷ taps | largest relative gradient difference |")
    print("|---|---:|---:|---:|---:|")
    print(f"| forward, backward, AdamW | {library:.0f} | {taps:.0f} | {library / taps:.2f} | {difference:.1e} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
