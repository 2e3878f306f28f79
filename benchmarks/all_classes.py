"""Maps for all 1000 classes of resnet50 (random weights), batch 4, 224x224, against one plain inference.

One forward pass and chunked batched backwards (``is_grads_batched``) give every class's map; the peers
need one call per class (over 1000x). One untimed call of each first, then rounds timed as in ``timing.py``
(every call once a round, in an order rotated from round to round, garbage collection paused around each
timed call); prints the median of each and its ratio to the inference's median.
Run: ``.venv/bin/python benchmarks/all_classes.py [--rounds 5] [--method gradcam]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import gradcam
import timing
from timing import Contender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    cam = gradcam.methods.get(args.method)(model, "layer4")

    def inference() -> None:
        with torch.inference_mode():
            model(x)

    def all_raw() -> None:
        cam(x, "all")

    def all_with_maps() -> None:
        cam(x, "all").maps  # noqa: B018 - materialise the (1000, B, 224, 224) upsampled maps

    contenders = [
        Contender("inference", inference),
        Contender("all classes (raw)", all_raw),
        Contender("all classes + maps", all_with_maps),
    ]
    for contender in contenders:
        contender.call()  # warm-up
    timing.run_rounds(contenders, args.rounds)
    base = statistics.median(contenders[0].times)
    print(
        f"resnet50, batch {args.batch}, 1000 classes, method {args.method}, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for contender in contenders:
        median = statistics.median(contender.times)
        print(f"{contender.name:22s} median {median:7.3f} s   ratio {median / base:6.2f}")
    ratio = statistics.median(contenders[1].times) / base
    print(f"all-class/inference ratio (median): {ratio:.2f} (target <= 7)")


if __name__ == "__main__":
    main()
