"""Every map an evaluation compares, behind one signature: (inputs, targets) -> maps.

A :data:`Saliency` takes model inputs (B,C,H,W) and the classes to explain (B,) and returns non-negative
maps (B,h,w) at any resolution (a CAM's layer grid, the input's size for pixel methods); evaluations
upsample them bilinearly to the size they need and divide each by its maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradcam.layouts import LayoutSpec
from gradcam.methods import registry
from gradcam.pipeline import Explainer

Saliency = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Maps that know nothing about the model (the registry's model-free baselines).
BASELINES = tuple(registry.names(["baseline"], needs_model=False))


def names() -> list[str]:
    """Every name :func:`make_saliency` accepts: every method of the registry."""
    return registry.names()


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
    """The map function of the registry's method ``name`` for ``model``.

    Args:
        name: any registry name: a CAM or attention method, "guided-backprop", "guided-gradcam", or a
            baseline ("randomcam", "random", "center", "sobel").
        layer: the CAM layer (None: automatic).
        mean, std: the model's input normalisation, so that ``sobel`` sees the picture in [0, 1].
        seed: seeds the ``random`` baseline and ``randomcam``.
        layout: the CAM layer's layout when it cannot be decided (see :class:`gradcam.GradCAM`).

    Every model method runs through :class:`gradcam.pipeline.Explainer`. Pixel methods give |g| summed
    over the colour channels (g the guided gradient), as the maps are drawn in the Grad-CAM paper.
    """
    entry = registry.get(name)
    if not entry.needs_model:
        return _baseline(entry.build, mean, std, seed)
    options: dict[str, object] = {"seed": seed} if name == "randomcam" else {}
    if entry.name != "guided-backprop":
        options.update(layer=layer, layout=layout)
    explainer = Explainer(model, name, **options)  # type: ignore[arg-type]
    if entry.kind == "pixel":
        return lambda x, t: explainer.explain(x, t).pictures()[0].abs().sum(dim=1)
    return lambda x, t: explainer.explain(x, t).explanation.raw[0]  # type: ignore[union-attr]


def _baseline(
    build: Callable[..., torch.Tensor], mean: Sequence[float], std: Sequence[float], seed: int
) -> Saliency:
    generator = torch.Generator().manual_seed(seed)
    return lambda x, t: build(x, mean, std, generator)
