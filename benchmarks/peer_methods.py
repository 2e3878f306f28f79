"""The methods added from the peers, each as a ratio to one forward, beside the peer's own implementation.

What is measured: the wall-clock time of one whole call (forward, targets, gradients or projections,
the map) of

* ``model(x)`` under ``torch.inference_mode()``: the baseline;
* gradcam's ``cam``, ``gradcam-elementwise``, ``kpcacam``, ``finercam``, ``shapleycam`` and
  ``fullgrad`` (every biased layer, no layer choice) on the top-1 class, each followed by the peer that
  ships it, on the same model, layer and batch:
  torchcam's ``CAM`` (with its forward, as its extractor reads the forward's activations),
  pytorch-grad-cam's ``GradCAMElementWise``, ``KPCA_CAM``, ``FinerCAM`` (its default comparison:
  the three nearest classes, alpha 1), ``ShapleyCAM`` (with ``ClassifierOutputReST``, as gradcam's
  default target) and ``FullGrad``, where importable;

for a torchvision classifier with random weights (default ``resnet18``) on a random batch (default
4 x 3 x 224 x 224), layer ``layer4``.

How: the protocol of ``timing.py`` (warm-up, rounds in rotated order, medians and per-round ratios to
the baseline). The closing lines give each method's per-round ratio beside its peer's.

Run: ``.venv/bin/python benchmarks/peer_methods.py [--rounds 7] [--batch 4] [--model resnet18]``.
A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import timing
from gradcam import methods
from timing import Contender

OURS = ("cam", "gradcam-elementwise", "kpcacam", "finercam", "shapleycam", "fullgrad")


def _pgc(kind: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, top: list[int]) -> Callable:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    target = ClassifierOutputReST if kind == "ShapleyCAM" else ClassifierOutputTarget

    def call() -> object:
        cam = getattr(pgc, kind)(model=model, target_layers=[] if kind == "FullGrad" else [layer])
        try:
            if kind == "FinerCAM":
                return cam(input_tensor=x, targets=None, alpha=1.0)
            return cam(input_tensor=x, targets=[target(c) for c in top])
        finally:
            (cam.base_cam if kind == "FinerCAM" else cam).activations_and_grads.release()

    return call


def _torchcam(model: nn.Module, x: torch.Tensor, top: list[int]) -> Callable:
    from torchcam.methods import CAM

    def call() -> object:
        with CAM(model, "layer4", "fc", input_shape=tuple(x.shape[1:])) as extractor, torch.no_grad():
            scores = model(x)
            return extractor(class_idx=top, scores=scores)

    return call


#: Our method -> (the peer's name, the peer's call maker (model, layer, x, top-1 classes)).
PEERS: dict[str, tuple[str, Callable]] = {
    "cam": ("torchcam CAM", lambda m, layer, x, top: _torchcam(m, x, top)),
    "gradcam-elementwise": ("pgc GradCAMElementWise", lambda *a: _pgc("GradCAMElementWise", *a)),
    "kpcacam": ("pgc KPCA_CAM", lambda *a: _pgc("KPCA_CAM", *a)),
    "finercam": ("pgc FinerCAM", lambda *a: _pgc("FinerCAM", *a)),
    "shapleycam": ("pgc ShapleyCAM (ReST)", lambda *a: _pgc("ShapleyCAM", *a)),
    "fullgrad": ("pgc FullGrad", lambda *a: _pgc("FullGrad", *a)),
}


def contenders(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[Contender], dict[str, tuple[Contender, Contender | None]]]:
    with torch.no_grad():
        top = model(x).argmax(dim=1).tolist()
    listed = [timing.inference(model, x)]
    pairs: dict[str, tuple[Contender, Contender | None]] = {}
    for name in OURS:
        cam = methods.get(name)(model) if name == "fullgrad" else methods.get(name)(model, "layer4")
        ours = Contender(f"gradcam {name}", lambda cam=cam: cam(x))
        peer_name, make = PEERS[name]
        try:
            peer = Contender(peer_name, make(model, model.layer4, x, top))
        except ImportError:
            print(f"{peer_name}: not importable, skipped")
            peer = None
        listed += [ours] + ([peer] if peer else [])
        pairs[name] = (ours, peer)
    return listed, pairs


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = timing.prepare(args)
    print(timing.machine(device))
    model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    listed, pairs = contenders(model, x)
    print(f"{args.model}: batch {args.batch}x3x{args.size}x{args.size}, layer layer4")
    timing.measure(listed, args, device, started=started)
    base = listed[0].times

    def ratio(contender: Contender) -> float:
        return statistics.median(t / b for t, b in zip(contender.times, base, strict=True))

    for name, (ours, peer) in pairs.items():
        theirs = "" if peer is None else f", {peer.name}: {ratio(peer):.2f}"
        print(f"{name}: {ratio(ours):.2f} forwards per call (median per round){theirs}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_shape_options(parser, rounds=7, warmup=1, batch=4)
    parser.add_argument("--model", default="resnet18")
    timing.add_run_options(parser, device=True, budget=240.0)
    return timing.check_options(parser, parser.parse_args())


if __name__ == "__main__":
    main()
