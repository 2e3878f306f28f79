"""Score-CAM and Ablation-CAM next to one plain inference pass.

What is measured: the wall-clock time (``time.perf_counter``) of one call of

* ``model(x)`` under ``torch.inference_mode()``: the baseline;
* ``AblationCAM(model, layer)(x)``: the fx path, which runs only the network after the layer on the
  cached, ablated activations;
* ``AblationCAM`` forced onto its fallback, which re-runs the whole network for every ablated batch
  (what the peers do);
* ``ScoreCAM(model, layer)(x)``: one whole forward per masked input;
* ``ScoreCAM(model, layer)(x, topk=3)``: the same masked forwards, scored for three classes at once;

for a torchvision classifier with random weights (default ``resnet50``, layer ``layer4``: 2048 channels)
in eval mode, on a random batch (default 1 x 3 x 224 x 224), ``--chunk`` perturbed inputs per forward.

The two whole-network contenders cost about K/chunk forwards of ``chunk`` images per image (for
ResNet-50, about 60 forwards of 32 images: minutes on a small CPU). By default they are therefore
*projected*: each is run on the first ``--sample`` chunks of every image (the library's own code, cut
short) and its time scaled by all chunks / chunks run. Every chunk is the same work (same batch size,
same network) and the rest of the call (one forward, the map) is small next to 16 chunks, so the
projection is close (it errs high by that small rest, scaled); ``--full`` times the complete calls
instead. Nothing is asserted: this is a measurement, not a test.

How: one untimed call of everything first (kernel set-up, allocator growth). Then ``--rounds`` rounds
of the fast contenders (baseline, Ablation-CAM fx) as in ``timing.py`` (an order rotated from round to
round, garbage collection paused around each timed call, on CUDA the device synchronised before and
after it), median and minimum reported; the slow contenders are timed once, the same way, between those
rounds.

Run: ``.venv/bin/python benchmarks/score_ablation.py [--batch 1] [--rounds 5] [--sample 16] [--full]
[--chunk 32] [--topk 3] [--model resnet50] [--layer layer4] [--threads N] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import timing
from gradcam.methods.score import AblationCAM, ScoreCAM
from timing import Contender


def truncated(method: type, chunks_per_image: int | None, record: dict[str, int]) -> type:
    """``method`` scoring only the first ``chunks_per_image`` chunks of every image (None: all).

    ``record`` receives the chunks a full call would score ("total") and those scored ("scored").
    """

    class Truncated(method):
        def _chunks(self, live: list[torch.Tensor]) -> list[list[torch.Tensor]]:
            chunks = super()._chunks(live)
            kept = [image[:chunks_per_image] for image in chunks]
            record["total"] = sum(map(len, chunks))
            record["scored"] = sum(map(len, kept))
            return kept

    return Truncated


def whole_model(method: type) -> type:
    """Ablation-CAM forced onto its fallback: the whole network re-run for every ablated batch."""

    class WholeModel(method):
        _use_tail = False

    return WholeModel


def slow_row(
    name: str,
    method: type,
    model: nn.Module,
    args: argparse.Namespace,
    x: torch.Tensor,
    device: torch.device,
    topk: int | None = None,
) -> Contender:
    """Time ``method`` on the first ``--sample`` chunks of every image and scale to all chunks, or time
    the complete call (``--full``); with ``topk``, the call explains each image's k best classes."""
    record: dict[str, int] = {}
    keep = None if args.full else args.sample
    cam = truncated(method, keep, record)(model, args.layer, batch_size=args.chunk)

    def call() -> object:
        return cam(x, topk=topk)

    seconds = timing.timed(call, device)
    total, scored = record["total"], record["scored"]
    if scored == total:
        return Contender(name, call, [seconds], f"full call, {total} chunks")
    note = f"projected: {scored} of {total} chunks took {seconds:.1f} s"
    return Contender(name, call, [seconds * total / scored], note)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_shape_options(parser, batch=1)
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--layer", default="layer4", help="explained layer (default layer4)")
    parser.add_argument("--chunk", type=int, default=32, help="perturbed inputs per forward (default 32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the fast rows (default 5)")
    parser.add_argument("--sample", type=int, default=16, help="chunks per image timed for a projection")
    parser.add_argument("--full", action="store_true", help="time the slow rows fully instead of projecting")
    parser.add_argument("--topk", type=int, default=3, help="targets per image of the scorecam topk row")
    timing.add_run_options(parser, device=True)
    args = parser.parse_args()
    if min(args.batch, args.chunk, args.rounds, args.sample) < 1:
        parser.error("--batch, --chunk, --rounds and --sample must be >= 1")
    return args


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = timing.prepare(args)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(
        f"{args.model} (random weights), layer {args.layer}, batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.chunk} perturbed inputs per forward, {timing.machine(device)}"
    )

    ablation = AblationCAM(model, args.layer, batch_size=args.chunk)
    fast = [
        timing.inference(model, x),
        Contender("ablationcam (fx tail)", lambda: ablation(x)),
    ]
    for contender in fast:  # warm-up
        contender.call()
    whole = whole_model(AblationCAM)
    truncated(ScoreCAM, 1, {})(model, args.layer, batch_size=args.chunk)(x)  # warm-up
    truncated(whole, 1, {})(model, args.layer, batch_size=args.chunk)(x)

    slow: list[Contender] = []

    def slow_rows(round_index: int) -> None:
        if round_index == args.rounds // 2:  # the slow rows once, in the middle of the fast rounds
            slow.append(slow_row("ablationcam (whole network)", whole, model, args, x, device))
            slow.append(slow_row("scorecam", ScoreCAM, model, args, x, device))
            slow.append(slow_row(f"scorecam topk={args.topk}", ScoreCAM, model, args, x, device, args.topk))

    timing.run_rounds(fast, args.rounds, device, after_round=slow_rows)

    base = statistics.median(fast[0].times)
    header = f"{'':30} {'median s':>9} {'min s':>9} {'x inference':>12}  how"
    print(header)
    print("-" * len(header))
    for row in fast + slow:
        median = statistics.median(row.times)
        note = row.note or f"median of {len(row.times)} rounds"
        print(f"{row.name:30} {median:9.3f} {min(row.times):9.3f} {median / base:12.1f}  {note}")
    fx, rerun, score = (statistics.median(row.times) for row in (fast[1], slow[0], slow[1]))
    print(f"ablationcam: fx tail {rerun / fx:.0f}x faster than re-running the whole network")
    print(f"ratios to one inference pass: scorecam {score / base:.0f}x, ablationcam {fx / base:.1f}x")
    several = statistics.median(slow[2].times)
    print(
        f"scorecam topk={args.topk} costs {several / score:.2f}x its topk=1 call "
        f"(the masked forwards are shared across the {args.topk} targets when this is about 1)"
    )
    print(f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
