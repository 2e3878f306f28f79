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

How: the measurement protocol of ``timing.py``, as in ``overhead.py``: one untimed inference and
``--warmup`` rounds first, then N rounds calling every contender once in an order rotated from round to
round, garbage collection paused around each timed call and, on CUDA, the device synchronised before
and after it; per contender the median and minimum time, the ratio of its median to the baseline's
median and the median (with quartiles) of its per-round ratios to the baseline of the same round. The
automatic GradCAM's first call is timed once, after the other contenders have warmed the process up,
and reported on its own line. An ``exactness`` line compares gradcam's raw map with pytorch-grad-cam's
un-normalised one (its CAM before ``scale_cam_image``) for the same layer and targets. The timed rounds
stop early once the run has taken ``--budget`` seconds (default 150), and say so.

Run: ``.venv/bin/python benchmarks/transformer_overhead.py [--rounds 5] [--batch 8]
[--model vit_small_patch16_224] [--layer blocks.11.norm1] [--threads N] [--device cpu]``. This is a
measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import timm
import torch
from torch import nn

import gradcam
import timing
from timing import Contender

TARGET_RATIO = 1.15
ATTENTION_METHODS = ("AttentionRollout", "GenericAttention")


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


def others(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> list[Contender]:
    """The contenders after gradcam's GradCAM rows: pytorch-grad-cam's, then gradcam's attention methods."""
    return [*peer_contenders(model, layer, x), *attention_contenders(model, x)]


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
    timing.add_shape_options(parser, rounds=5, warmup=2, batch=8)
    parser.add_argument(
        "--model", default="vit_small_patch16_224", help="timm ViT name (default vit_small_patch16_224)"
    )
    parser.add_argument(
        "--layer", default="blocks.11.norm1", help="explicit layer to time (default blocks.11.norm1)"
    )
    timing.add_run_options(parser, device=True, budget=150.0)
    return timing.check_options(parser, parser.parse_args())


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = timing.prepare(args)
    model = build_model(args.model, args.size, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    timing.gradcam_overhead(
        args, model, x, device, started, others=others, check=exactness, unit="ms", target=TARGET_RATIO
    )


if __name__ == "__main__":
    main()
