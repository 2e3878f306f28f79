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

How: the measurement protocol of ``timing.py``: one untimed inference and ``--warmup`` rounds first,
then N rounds calling every contender once in an order rotated from round to round, garbage collection
paused around each timed call; per contender the median and minimum time, the ratio of its median to
the baseline's median and the median (with quartiles) of its per-round ratios to the baseline of the
same round. The automatic GradCAM's first call is timed once, after the other contenders have warmed
the process up, and reported on its own line; the last line gives the ratio of medians for
``GradCAM(model)`` (automatic layer). On a busy machine the timed rounds stop early once the run has
taken ``--budget`` seconds (default 150), and say so.

Run: ``.venv/bin/python benchmarks/overhead.py [--rounds 15] [--batch 8] [--model resnet50]
[--layer layer4] [--threads N]``. This is a measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

import gradcam
import timing
from timing import Contender

TARGET_RATIO = 1.10


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
    timing.add_shape_options(parser, rounds=15, warmup=3, batch=8)
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--layer", default="layer4", help="explicit layer to time (default layer4)")
    timing.add_run_options(parser, budget=150.0)
    return timing.check_options(parser, parser.parse_args())


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = timing.prepare(args)
    model = build_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    timing.gradcam_overhead(
        args, model, x, device, started, others=peer_contenders, check=agreement, target=TARGET_RATIO
    )


if __name__ == "__main__":
    main()
