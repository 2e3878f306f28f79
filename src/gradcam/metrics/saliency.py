"""Every map an evaluation compares, behind one signature: (inputs, targets) -> maps.

A :data:`Saliency` takes model inputs (B,C,H,W) and the classes to explain (B,) and returns non-negative
maps (B,h,w) at any resolution (a CAM's layer grid, the input's size for pixel methods); evaluations
upsample them bilinearly to the size they need and divide each by its maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradcam import methods
from gradcam.errors import GradCAMError
from gradcam.layouts import LayoutSpec
from gradcam.methods import GuidedBackprop, GuidedGradCAM, RandomCAM
from gradcam.methods import maps as baselines

Saliency = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Pixel-level gradient methods, beside the CAMs of :mod:`gradcam.methods`.
PIXEL_METHODS = ("guided-backprop", "guided-gradcam")
#: Maps that know nothing about the model (see :mod:`gradcam.metrics.baselines`).
BASELINES = ("random", "center", "sobel")


def names() -> list[str]:
    """Every name :func:`make_saliency` accepts: the CAM methods, the pixel methods, the baselines."""
    return [*methods.names(), *PIXEL_METHODS, *BASELINES]


def make_saliency(
    name: str,
    model: nn.Module,
    *,
    layer: str | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    layout: LayoutSpec = None,
) -> Saliency:
    """The map function registered under ``name`` for ``model``.

    Args:
        name: a CAM method ("gradcam", "gradcam++", ...), "guided-backprop", "guided-gradcam", or a
            baseline ("random", "center", "sobel").
        layer: the CAM layer (None: automatic).
        mean, std: the model's input normalisation, so that ``sobel`` sees the picture in [0, 1].
        seed: seeds the ``random`` baseline and ``randomcam``.
        layout: the CAM layer's layout when it cannot be decided (see :class:`gradcam.GradCAM`).

    Pixel methods give |g| summed over the colour channels (g the guided gradient), as the maps are
    drawn in the Grad-CAM paper.
    """
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return lambda x, t: baselines.random_map(len(x), (x.shape[2], x.shape[3]), generator)
    if name == "center":
        return lambda x, t: baselines.center_map(len(x), (x.shape[2], x.shape[3]))
    if name == "sobel":
        return lambda x, t: baselines.sobel_map(baselines.unnormalise(x, mean, std))
    if name == "guided-backprop":
        guided = GuidedBackprop(model)
        return lambda x, t: guided(x, t).abs().sum(dim=1)
    if name == "guided-gradcam":
        guided_cam = GuidedGradCAM(model, layer, layout=layout)
        return lambda x, t: guided_cam(x, t).abs().sum(dim=1)
    if name not in methods.names():
        raise GradCAMError(f"method '{name}' not found; available: {', '.join(names())}")
    cls = methods.get(name)
    options: dict[str, object] = {"seed": seed} if cls is RandomCAM else {}
    if layout is not None:
        options["layout"] = layout
    cam = cls(model, layer, **options)
    return lambda x, t: cam(x, t).raw
