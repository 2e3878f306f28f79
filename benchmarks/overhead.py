"""Overhead of a Grad-CAM call relative to plain inference on the CPU.

What is measured: the wall-clock time (``time.perf_counter``) of one call of

* ``model(x)`` under ``torch.inference_mode()``: the baseline, the cheapest way to run the model;
* ``gradcam.GradCAM(model)(x)``: automatic layer choice (``layer=None``); the engine remembers the
  automatic choice after its first call, so the steady state is timed and the cold first call, which
  includes the layer search, is reported on its own line;
* ``gradcam.GradCAM(model, "layer4")(x)``: the layer named explicitly;
* ``captum.attr.LayerGradCam(model, model.layer4).attribute(x, target=top1)`` as a peer figure (when
  captum is importable), and pytorch-grad-cam's ``GradCAM`` when that package is importable;

for a torchvision classifier with random weights (default ``resnet50``) in eval mode, on a random batch
(default 8 x 3 x 224 x 224). Every Grad-CAM call does the whole job: forward, top-1 targets, gradients,
maps, upsampling and normalisation.

How: one untimed inference and ``--warmup`` rounds first (a process's first forwards pay one-off kernel
and allocator set-up); the automatic GradCAM's first call is timed once, after the other contenders
have warmed the process up, then it is warmed up too. Each of N rounds then calls every contender once,
in an order rotated from round to round, so that machine noise and position effects hit all of them
alike. Garbage collection is paused around each timed call. Reported per contender: the median and
minimum time, the ratio of its median to the baseline's median, and the median (with quartiles) of its
per-round ratios to the baseline of the same round. The last line gives the ratio of medians for
``GradCAM(model)`` (automatic layer). On a busy machine the timed rounds stop early once the run has
taken ``--budget`` seconds (default 150), and say so.

Run: ``.venv/bin/python benchmarks/overhead.py [--rounds 15] [--batch 8] [--model resnet50]
[--layer layer4] [--threads N]``. This is a measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

import gradcam

TARGET_RATIO = 1.10


@dataclass
class Contender:
    """One timed callable and the times it took, one per round."""

    name: str
    call: Callable[[], object]
    times: list[float] = field(default_factory=list)


def timed(call: Callable[[], object]) -> float:
    """Seconds one call of ``call`` takes, with garbage collection paused for its duration."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile; both equal the value itself for a single value."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def build_model(name: str) -> nn.Module:
    """A torchvision classification model with random weights, in eval mode."""
    return torchvision.models.get_model(name, weights=None).eval()


def peer_contenders(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> list[Contender]:
    """Other libraries' Grad-CAM on the same model, layer and inputs, for those that are importable."""
    with torch.no_grad():  # not inference_mode: the peers feed these indices into autograd-recorded ops
        top1 = model(x).argmax(dim=1)
    peers: list[Contender] = []
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        print("captum not importable: skipped")
    else:
        captum_cam = LayerGradCam(model, layer)
        peers.append(Contender("captum LayerGradCam", lambda: captum_cam.attribute(x, target=top1)))
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pass  # pytorch-grad-cam (pip package grad-cam) is optional
    else:
        targets = [ClassifierOutputTarget(int(c)) for c in top1]

        def pytorch_grad_cam_call() -> object:
            # Built per call inside ``with`` so its hooks never stay on the model during the other calls.
            with PGCGradCAM(model=model, target_layers=[layer]) as cam:
                return cam(input_tensor=x, targets=targets)

        peers.append(Contender("pytorch-grad-cam GradCAM", pytorch_grad_cam_call))
    return peers


def agreement(model: nn.Module, layer_name: str, layer: nn.Module, x: torch.Tensor) -> str:
    """One line comparing gradcam's raw map with captum's (ReLU'd) map: the peers do the same work."""
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        return "agreement with captum: not checked (captum not importable)"
    explanation = gradcam.GradCAM(model, layer_name)(x)
    with torch.no_grad():
        top1 = model(x).argmax(dim=1)
    theirs = torch.relu(LayerGradCam(model, layer).attribute(x, target=top1)[:, 0]).detach()
    peak = theirs.abs().max().clamp_min(1e-30)
    error = ((explanation.raw - theirs).abs().max() / peak).item()
    same_targets = bool(torch.equal(explanation.targets, top1))
    return (
        f"agreement with captum: max |gradcam - captum| / max |captum| = {error:.1e}, "
        f"same targets: {same_targets}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--layer", default="layer4", help="explicit layer to time (default layer4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    parser.add_argument(
        "--budget",
        type=float,
        default=150.0,
        help="end the timed rounds once the run has taken this many seconds, 0: no limit (default 150)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1, --warmup >= 0")
    return args


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    layer = dict(model.named_modules()).get(args.layer)
    if layer is None:
        raise SystemExit(f"model {args.model} has no module named '{args.layer}'; pass --layer")

    print(
        f"{args.model} (random weights), batch {args.batch}x3x{args.size}x{args.size}, CPU "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up"
    )

    def inference() -> object:
        with torch.inference_mode():
            return model(x)

    auto_cam = gradcam.GradCAM(model)
    explicit_cam = gradcam.GradCAM(model, args.layer)
    baseline = Contender("inference_mode forward", inference)
    auto = Contender("gradcam layer=None", lambda: auto_cam(x))
    contenders = [
        baseline,
        auto,
        Contender(f"gradcam layer={args.layer!r}", lambda: explicit_cam(x)),
        *peer_contenders(model, layer, x),
    ]

    # Warm up everything but the automatic GradCAM first: the process's first forwards are slow for
    # reasons that have nothing to do with the engine (kernel set-up, the allocator growing its heap).
    timed(inference)
    for _ in range(max(args.warmup, 1)):
        for contender in contenders:
            if contender is not auto:
                contender.call()
    first_auto = timed(auto.call)  # cold: includes the automatic layer search
    chosen = auto_cam(x).layer
    for _ in range(args.warmup):
        auto.call()

    for round_index in range(args.rounds):
        gc.collect()
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.times.append(timed(contender.call))
        if args.budget and time.perf_counter() - started > args.budget and round_index + 1 < args.rounds:
            done = round_index + 1
            print(f"time budget of {args.budget:.0f} s spent: stopped after {done} rounds (busy machine?)")
            break

    base_median = statistics.median(baseline.times)
    header = f"{'':32} {'median s':>9} {'min s':>8} {'ratio of medians':>17} {'per-round ratio [q1, q3]':>26}"
    print(header)
    print("-" * len(header))
    for contender in contenders:
        median = statistics.median(contender.times)
        ratios = [t / b for t, b in zip(contender.times, baseline.times, strict=True)]
        q1, q3 = quartiles(ratios)
        per_round = f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"
        print(
            f"{contender.name:32} {median:9.4f} {min(contender.times):8.4f} "
            f"{median / base_median:17.3f} {per_round:>26}"
        )
    print(f"{'gradcam layer=None, 1st call':32} {first_auto:9.4f} {'':8} {first_auto / base_median:17.3f}")
    print(f"automatic layer: {chosen}")
    print(agreement(model, args.layer, layer, x))
    print(f"{len(baseline.times)} timed rounds, whole run {time.perf_counter() - started:.0f} s")
    ratio = statistics.median(auto.times) / base_median
    print(f"gradcam/inference ratio (median): {ratio:.2f} (target <= {TARGET_RATIO:.2f})")


if __name__ == "__main__":
    main()
