"""Overhead of Grad-CAM on a vision transformer relative to plain inference.

What is measured: the wall-clock time (``time.perf_counter``) of one call of

* ``model(x)`` under ``torch.inference_mode()``: the baseline, the cheapest way to run the model;
* ``gradcam.GradCAM(model)(x)``: automatic layer choice (``layer=None``, ``blocks.11.norm1`` for a timm
  ViT); the engine remembers the choice after its first call, so the steady state is timed and the cold
  first call, which includes the layer search, is reported on its own line;
* ``gradcam.GradCAM(model, "blocks.11.norm1")(x)``: the layer named explicitly;
* pytorch-grad-cam's ``GradCAM`` on the same layer with its standard ViT ``reshape_transform`` (drop the
  prefix tokens, reshape to the patch grid, channels first) and ``ClassifierOutputTarget`` for each
  image's top-1 class, when that package is importable;
* ``gradcam.AttentionRollout(model)(x)`` and ``gradcam.GenericAttention(model)(x)``, when the package
  has them (skipped with a note otherwise);

for a timm vision transformer with random weights (default ``vit_small_patch16_224``) in eval mode, on
a random batch (default 8 x 3 x 224 x 224). Every call does the whole job: forward, top-1 targets,
gradients (where the method uses them), maps, upsampling and normalisation.

How: as ``overhead.py``. One untimed inference and ``--warmup`` rounds first; the automatic GradCAM's
first call is timed once, after the other contenders have warmed the process up, then it is warmed up
too. Each of N rounds then calls every contender once, in an order rotated from round to round. Garbage
collection is paused around each timed call, and on CUDA the device is synchronised before and after
it. Reported per contender: the median and minimum time, the ratio of its median to the baseline's
median, and the median (with quartiles) of its per-round ratios to the baseline of the same round. An
``exactness`` line compares gradcam's raw map with pytorch-grad-cam's un-normalised one (its CAM before
``scale_cam_image``) for the same layer and targets. The timed rounds stop early once the run has taken
``--budget`` seconds (default 150), and say so.

Run: ``.venv/bin/python benchmarks/transformer_overhead.py [--rounds 5] [--batch 8]
[--model vit_small_patch16_224] [--layer blocks.11.norm1] [--threads N] [--device cpu]``. This is a
measurement, not a test: nothing is asserted.
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

import numpy as np
import timm
import torch
from torch import nn

import gradcam

TARGET_RATIO = 1.15
ATTENTION_METHODS = ("AttentionRollout", "GenericAttention")


@dataclass
class Contender:
    """One timed callable and the times it took, one per round."""

    name: str
    call: Callable[[], object]
    times: list[float] = field(default_factory=list)


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, with garbage collection paused and the device synchronised."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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


def build_model(name: str, size: int, device: torch.device) -> nn.Module:
    """A timm vision transformer with random weights (no download), in eval mode, for ``size`` inputs."""
    return timm.create_model(name, pretrained=False, img_size=size).eval().to(device)


def vit_reshape_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's ViT ``reshape_transform``: (B, prefix + h*w, D) -> (B, D, h, w)."""
    height, width = model.patch_embed.grid_size
    prefix = getattr(model, "num_prefix_tokens", 1)

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.permute(0, 3, 1, 2)

    return reshape_transform


def top1(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: the peers feed these indices into autograd-recorded ops
        return model(x).argmax(dim=1)


def peer_contenders(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> list[Contender]:
    """pytorch-grad-cam's GradCAM on the same model, layer and inputs, when it is importable."""
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("pytorch-grad-cam not importable: skipped")
        return []
    targets = [ClassifierOutputTarget(int(c)) for c in top1(model, x)]
    reshape = vit_reshape_transform(model)

    def pytorch_grad_cam_call() -> object:
        # Built per call inside ``with`` so its hooks never stay on the model during the other calls.
        with PGCGradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            return cam(input_tensor=x, targets=targets)

    return [Contender("pytorch-grad-cam GradCAM", pytorch_grad_cam_call)]


def attention_contenders(model: nn.Module, x: torch.Tensor) -> list[Contender]:
    """gradcam's attention methods, for those the package has (a note for each one it lacks)."""
    found: list[Contender] = []
    for name in ATTENTION_METHODS:
        method = getattr(gradcam, name, None)
        if method is None:
            print(f"gradcam.{name} not available: row skipped")
            continue
        explainer = method(model)
        found.append(Contender(f"gradcam {name}", lambda explainer=explainer: explainer(x)))
    return found


def exactness(model: nn.Module, layer_name: str, layer: nn.Module, x: torch.Tensor) -> str:
    """One line comparing gradcam's raw map with pytorch-grad-cam's un-normalised map (same layer and
    targets): ReLU of its ``get_cam_image`` on the gradients of the summed top-1 scores, i.e. its CAM
    before ``scale_cam_image``."""
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return "exactness vs pytorch-grad-cam: not checked (pytorch-grad-cam not importable)"
    explanation = gradcam.GradCAM(model, layer_name)(x)
    ids = top1(model, x)
    targets = [ClassifierOutputTarget(int(c)) for c in ids]
    reshape = vit_reshape_transform(model)
    with PGCGradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        outputs = cam.activations_and_grads(x)
        model.zero_grad()
        sum(target(output) for target, output in zip(targets, outputs, strict=True)).backward()
        activations = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        theirs = np.maximum(cam.get_cam_image(x, layer, targets, activations, grads), 0)
    model.zero_grad(set_to_none=True)
    theirs_t = torch.from_numpy(theirs).float()
    peak = theirs_t.abs().max().clamp_min(1e-30)
    error = ((explanation.raw.float() - theirs_t).abs().max() / peak).item()
    same_targets = bool(torch.equal(explanation.targets, ids.cpu()))
    return (
        f"exactness vs pytorch-grad-cam: max |gradcam raw - pgc raw| / max |pgc raw| = {error:.1e}, "
        f"same targets: {same_targets}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument(
        "--model", default="vit_small_patch16_224", help="timm ViT name (default vit_small_patch16_224)"
    )
    parser.add_argument(
        "--layer", default="blocks.11.norm1", help="explicit layer to time (default blocks.11.norm1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
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
    device = torch.device(args.device)
    model = build_model(args.model, args.size, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layer = dict(model.named_modules()).get(args.layer)
    if layer is None:
        raise SystemExit(f"model {args.model} has no module named '{args.layer}'; pass --layer")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"

    print(
        f"{args.model} (random weights), batch {args.batch}x3x{args.size}x{args.size}, {device.type.upper()} "
        f"({where or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
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
        *attention_contenders(model, x),
    ]

    # Warm up everything but the automatic GradCAM first: the process's first forwards are slow for
    # reasons that have nothing to do with the engine (kernel set-up, the allocator growing its heap).
    timed(inference, device)
    for _ in range(max(args.warmup, 1)):
        for contender in contenders:
            if contender is not auto:
                contender.call()
    first_auto = timed(auto.call, device)  # cold: includes the automatic layer search
    chosen = auto_cam(x).layer
    for _ in range(args.warmup):
        auto.call()

    for round_index in range(args.rounds):
        gc.collect()
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.times.append(timed(contender.call, device))
        if args.budget and time.perf_counter() - started > args.budget and round_index + 1 < args.rounds:
            done = round_index + 1
            print(f"time budget of {args.budget:.0f} s spent: stopped after {done} rounds (busy machine?)")
            break

    base_median = statistics.median(baseline.times)
    header = (
        f"{'':32} {'median ms':>10} {'min ms':>8} {'ratio of medians':>17} {'per-round ratio [q1, q3]':>26}"
    )
    print(header)
    print("-" * len(header))
    for contender in contenders:
        median = statistics.median(contender.times)
        ratios = [t / b for t, b in zip(contender.times, baseline.times, strict=True)]
        q1, q3 = quartiles(ratios)
        per_round = f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"
        print(
            f"{contender.name:32} {median * 1e3:10.1f} {min(contender.times) * 1e3:8.1f} "
            f"{median / base_median:17.3f} {per_round:>26}"
        )
    first = f"{first_auto * 1e3:10.1f} {'':8} {first_auto / base_median:17.3f}"
    print(f"{'gradcam layer=None, 1st call':32} {first}")
    print(f"automatic layer: {chosen}")
    print(exactness(model, args.layer, layer, x))
    print(f"{len(baseline.times)} timed rounds, whole run {time.perf_counter() - started:.0f} s")
    ratio = statistics.median(auto.times) / base_median
    print(f"gradcam/inference ratio (median): {ratio:.2f} (target <= {TARGET_RATIO:.2f})")


if __name__ == "__main__":
    main()
