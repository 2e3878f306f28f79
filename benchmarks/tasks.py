"""Cost of a box map (detector) and a mask map (segmenter) as a ratio to one forward of the model.

What is measured: the wall-clock time of one call of

* **detector** (default ``fasterrcnn_mobilenet_v3_large_320_fpn``, random weights, its score threshold
  at 0 so that it returns detections; a list of ``--batch`` images of ``--size`` pixels):
  ``model(images)`` under ``torch.inference_mode()`` (the baseline); ``GradCAM(model)(images,
  targets=Box(label, box))`` for each image's best detection; ``Detections(min_score=0, topk=3)``
  (three box maps per image from one forward and one batched backward); Eigen-CAM (no gradient);
  pytorch-grad-cam's GradCAM with ``FasterRCNNBoxScoreTarget`` on the same layer, one image per call as
  its detector recipe does, where importable;
* **segmenter** (default ``lraspp_mobilenet_v3_large``, random weights, a (batch, 3, size, size) batch):
  ``model(x)`` under ``torch.inference_mode()``; ``GradCAM(model)(x, targets=Segmentation(c))`` over
  the predicted mask of each image's largest class; pytorch-grad-cam's GradCAM with
  ``SemanticSegmentationTarget`` on the same mask and layer (its segmentation tutorial's wrapper that
  returns ``model(x)["out"]``), where importable.

How: the protocol of ``timing.py``: warm-up, then rounds calling every contender once in an order rotated
from round to round; per contender the median, the ratio of medians and the median [q1, q3] of the
per-round ratios to the baseline. The last line of each part gives the map's per-round ratio.

Run: ``.venv/bin/python benchmarks/tasks.py [--rounds 7] [--batch 2] [--size 320] [--threads N]``.
A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torchvision.models import get_model

import timing
from gradcam import GradCAM, methods
from gradcam.layers import backbone_stage
from gradcam.models.torchvision_tasks import set_score_threshold
from gradcam.targets import Box, Detections, Segmentation
from timing import Contender


def _detector_peer(model: nn.Module, layer: nn.Module, images: list[torch.Tensor], boxes, labels) -> list:
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    except ImportError:
        return []

    def call() -> object:
        with PGCGradCAM(model=model, target_layers=[layer]) as cam:
            return [
                cam(image[None], targets=[FasterRCNNBoxScoreTarget([label], box[None])])
                for image, box, label in zip(images, boxes, labels, strict=True)
            ]

    return [Contender("pytorch-grad-cam box (per image)", call)]


def detector(args: argparse.Namespace, device: torch.device, started: float) -> None:
    model = get_model(args.detector, weights=None, weights_backbone=None, num_classes=91).eval().to(device)
    set_score_threshold(model, 0.0)
    images = [torch.rand(3, args.size, round(args.size * 1.25), device=device) for _ in range(args.batch)]
    with torch.no_grad():
        found = model(images)
    labels = [int(f["labels"][0]) for f in found]
    boxes = torch.stack([f["boxes"][0] for f in found])
    cam = GradCAM(model)
    eigen = methods.get("eigencam")(model)
    layer = model.get_submodule(backbone_stage(model))
    contenders = [
        timing.inference(model, images),  # type: ignore[arg-type]
        Contender("gradcam Box (1 map/image)", lambda: cam(images, targets=Box(labels, boxes))),
        Contender(
            "gradcam Detections topk=3", lambda: cam(images, targets=Detections(min_score=0.0, topk=3))
        ),
        Contender("gradcam Eigen-CAM", lambda: eigen(images, targets=Detections(min_score=0.0, topk=1))),
        *_detector_peer(model, layer, images, boxes, labels),
    ]
    shape = f"{args.size}x{round(args.size * 1.25)}"
    print(f"detector {args.detector}: {args.batch} images {shape}, layer {backbone_stage(model)}")
    timing.measure(contenders, args, device, started=started)
    _closing(contenders, "box map")


def _segmenter_peer(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes, masks) -> list:
    try:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    except ImportError:
        return []

    class Out(nn.Module):  # the tutorial's wrapper: the tensor under "out"
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.model(inputs)["out"]

    wrapped = Out()
    targets = [SemanticSegmentationTarget(c, m.float().numpy()) for c, m in zip(classes, masks, strict=True)]

    def call() -> object:
        with PGCGradCAM(model=wrapped, target_layers=[layer]) as cam:
            return cam(input_tensor=x, targets=targets)

    return [Contender("pytorch-grad-cam mask", call)]


def segmenter(args: argparse.Namespace, device: torch.device, started: float) -> None:
    model = get_model(args.segmenter, weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    model = model.eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.no_grad():
        predicted = model(x)["out"].argmax(dim=1)
    classes = [int(torch.bincount(p.flatten()).argmax()) for p in predicted]
    masks = [(p == c).cpu() for p, c in zip(predicted, classes, strict=True)]
    cam = GradCAM(model)
    layer = model.get_submodule(backbone_stage(model))
    contenders = [
        timing.inference(model, x),
        Contender("gradcam Segmentation (1 map/image)", lambda: cam(x, targets=Segmentation(classes))),
        *_segmenter_peer(model, layer, x, classes, masks),
    ]
    shape = f"{args.batch}x3x{args.size}x{args.size}"
    print(f"segmenter {args.segmenter}: batch {shape}, layer {backbone_stage(model)}")
    timing.measure(contenders, args, device, started=started)
    _closing(contenders, "mask map")


def _closing(contenders: list[Contender], label: str) -> None:
    base = contenders[0].times
    ratios = [t / b for t, b in zip(contenders[1].times, base, strict=True)]
    print(f"{label} ratio to one forward: {statistics.median(ratios):.2f} per round (median)\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_shape_options(parser, rounds=7, warmup=1, batch=2)
    parser.set_defaults(size=320)
    parser.add_argument("--detector", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--segmenter", default="lraspp_mobilenet_v3_large")
    timing.add_run_options(parser, device=True, budget=240.0)
    return timing.check_options(parser, parser.parse_args())


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = timing.prepare(args)
    print(timing.machine(device))
    detector(args, device, started)
    segmenter(args, device, time.perf_counter())


if __name__ == "__main__":
    main()
