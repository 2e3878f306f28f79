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
4 x 3 x 224 x 224), layer ``layer4``; then, on the same model:

* ``smoothgradcam++`` (4 noisy samples, std 0.3) beside torchcam's ``SmoothGradCAMpp`` with the same;
* ``dff`` (5 concepts) beside pytorch-grad-cam's ``DeepFeatureFactorization`` (5 components);
* the slow Score-CAM variants ``sscam`` and ``iscam`` (one forward per channel and sample) with 2
  samples each, beside torchcam's ``SSCAM`` and ``ISCAM`` with the same, on one image of
  ``--score-size`` (default 64) pixels;
* ``legrad`` beside torchcam's ``LeGrad`` (every layer, the class-token head as its score projection,
  the definition gradcam's LeGrad uses) on a torchvision ``VisionTransformer`` with random weights
  (image 224, patch 16, 6 layers, 6 heads, width 384) on the ``--batch``.

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
from gradcam.methods import registry
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


def _report(listed: list[Contender], pairs: dict[str, tuple[Contender, Contender | None]]) -> None:
    base = listed[0].times

    def ratio(contender: Contender) -> float:
        return statistics.median(t / b for t, b in zip(contender.times, base, strict=True))

    for name, (ours, peer) in pairs.items():
        theirs = "" if peer is None else f", {peer.name}: {ratio(peer):.2f}"
        print(f"{name}: {ratio(ours):.2f} forwards per call (median per round){theirs}")
    print()


def _measure(
    title: str, model: nn.Module, x: torch.Tensor, pairs: dict[str, tuple[Callable, str, Callable | None]],
    args: argparse.Namespace, device: torch.device,
) -> None:  # fmt: skip
    """Time each (ours, peer) pair beside one forward of ``model`` on ``x``, in the same rounds."""
    listed, made = [timing.inference(model, x)], {}
    for name, (ours, peer_name, peer) in pairs.items():
        mine = Contender(f"gradcam {name}", ours)
        theirs = None if peer is None else Contender(peer_name, peer)
        listed += [mine] + ([theirs] if theirs else [])
        made[name] = (mine, theirs)
    print(f"{title}: batch {'x'.join(map(str, x.shape))}")
    timing.measure(listed, args, device, started=time.perf_counter())
    _report(listed, made)


def _optional(make: Callable[[], Callable]) -> Callable | None:
    try:
        return make()
    except ImportError:
        return None


def _more_cnn(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[Callable, str, Callable | None]]:
    smooth = methods.get("smoothgradcam++")(model, "layer4", samples=4, std=0.3)
    dff = registry.get("dff").build(model, "layer4", concepts=5)

    def torchcam_smooth() -> Callable:
        from torchcam.methods import SmoothGradCAMpp

        def call() -> object:
            with SmoothGradCAMpp(
                model, "layer4", num_samples=4, std=0.3, input_shape=tuple(x.shape[1:])
            ) as cam:
                scores = model(x)
                return cam(class_idx=scores.argmax(dim=1).tolist(), scores=scores)

        return call

    def pgc_dff() -> Callable:
        from pytorch_grad_cam import DeepFeatureFactorization

        return lambda: DeepFeatureFactorization(model, model.layer4)(x, n_components=5)

    return {
        "smoothgradcam++": (lambda: smooth(x), "torchcam SmoothGradCAMpp", _optional(torchcam_smooth)),
        "dff": (lambda: dff(x), "pgc DeepFeatureFactorization", _optional(pgc_dff)),
    }


def _score_variants(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[Callable, str, Callable | None]]:
    def torchcam(kind: str, **options: object) -> Callable:
        import torchcam.methods as tc

        def call() -> object:
            with getattr(tc, kind)(model, "layer4", input_shape=tuple(x.shape[1:]), **options) as cam:
                with torch.no_grad():
                    scores = model(x)
                return cam(class_idx=scores.argmax(dim=1).tolist(), scores=scores)

        return call

    ss = methods.get("sscam")(model, "layer4", samples=2)
    integrated = methods.get("iscam")(model, "layer4", samples=2)
    return {
        "sscam": (lambda: ss(x), "torchcam SSCAM", _optional(lambda: torchcam("SSCAM", num_samples=2))),
        "iscam": (
            lambda: integrated(x),
            "torchcam ISCAM",
            _optional(lambda: torchcam("ISCAM", num_samples=2)),
        ),
    }


def _vit(device: torch.device, batch: int) -> tuple[nn.Module, torch.Tensor, dict]:
    shape = {"image_size": 224, "patch_size": 16, "num_layers": 6, "num_heads": 6, "hidden_dim": 384}
    model = torchvision.models.VisionTransformer(**shape, mlp_dim=1536, num_classes=1000).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    ours = methods.get("legrad")(model)

    def torchcam_legrad() -> Callable:
        from torchcam.methods import LeGrad

        def head(tokens: torch.Tensor) -> torch.Tensor:
            return model.heads(model.encoder.ln(tokens)[:, 0])

        def call() -> object:
            with LeGrad(model, list(model.encoder.layers), score_projection=head) as cam:
                scores = model(x)
                return cam(scores.argmax(dim=1).tolist(), normalized=False)

        return call

    return model, x, {"legrad": (lambda: ours(x), "torchcam LeGrad", _optional(torchcam_legrad))}


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
    _report(listed, pairs)
    _measure(f"{args.model}, noise and concepts", model, x, _more_cnn(model, x), args, device)
    small = torch.randn(1, 3, args.score_size, args.score_size, device=device)
    _measure(
        f"{args.model}, slow Score-CAM variants", model, small, _score_variants(model, small), args, device
    )
    vit, tokens, legrad = _vit(device, args.batch)
    _measure("torchvision VisionTransformer (6 layers, width 384)", vit, tokens, legrad, args, device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_shape_options(parser, rounds=7, warmup=1, batch=4)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--score-size", type=int, default=64, help="input size of the slow Score-CAM part")
    timing.add_run_options(parser, device=True, budget=240.0)
    return timing.check_options(parser, parser.parse_args())


if __name__ == "__main__":
    main()
