"""One batch of images through one model and method, as the pictures and numbers the service returns.

Any method of :mod:`gradcam.methods.registry` that needs a model: the CAM and attention methods, and the
two guided views of the Grad-CAM paper (Selvaraju et al., ICCV 2017, section 3.1), ``guided-backprop``
(Springenberg et al. 2015) and ``guided-gradcam``, the element-wise product of Guided Backpropagation and
the upsampled Grad-CAM map. Images in one call may want different classes: they are explained together,
one forward for all of them (see :func:`render`). A class map is sent as a colormapped heatmap at the
picture's size; the browser draws it over the picture at the opacity the user picks.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from gradcam import viz
from gradcam.explanation import Explanation
from gradcam.methods import registry
from gradcam.models import LoadedModel, model_device
from gradcam.pipeline import Explainer, Result

#: The hint for a slow method a server does not offer.
SLOW_HINT = " (enabled with --slow-methods)"


def offered(slow_methods: bool) -> list[str]:
    """The methods a server offers: every registered method that needs a model; the slow ones (one
    forward per channel of the layer, minutes per image on a CPU) only with ``slow_methods``."""
    return [m.name for m in registry.entries(needs_model=True, slow=None if slow_methods else False)]


def method_entry(method: str, choices: Sequence[str] | None = None) -> registry.Method:
    """The registry's entry of ``method`` when it is among ``choices`` (default: every method that
    needs a model); the registry's one-line GradCAMError otherwise, with a hint for a slow method."""
    choices = offered(True) if choices is None else choices
    slow = method in {m.name for m in registry.entries(slow=True)}
    return registry.get(method, choices, hint=SLOW_HINT if slow else "")


@dataclass
class TargetView:
    """One explained class of one image."""

    index: int
    name: str
    probability: float
    score: float
    heatmap: Image.Image | None  # the colormapped map at the picture's size (None: guided-backprop)
    guided: Image.Image | None  # the guided-backprop / guided-gradcam picture, in the model's input view
    raw: np.ndarray | None  # the map at the layer's resolution (None: guided-backprop)


@dataclass
class ImageView:
    """One image explained: its picture (the frame the maps register with), top-5 and targets."""

    model: str
    method: str
    layer: str | None
    picture: Image.Image
    predictions: list[tuple[int, str, float]]
    targets: list[TargetView]


# An Explainer remembers the automatically found layer: keep one per model, method and layer for as
# long as the model lives.
_explainers: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str | None], Explainer]] = (
    weakref.WeakKeyDictionary()
)


def _explainer(module: nn.Module, method: str, layer: str | None) -> Explainer:
    cached = _explainers.setdefault(module, {})
    key = (method, layer)
    if key not in cached:
        cached[key] = Explainer(module, method, layer=layer)
    return cached[key]


@dataclass
class Prepared:
    """One image as a model needs it: its input tensor and the frame picture its maps are drawn on (at
    most ``display_size`` a side). The image itself can be dropped once this is made."""

    tensor: torch.Tensor
    picture: Image.Image


def prepare(loaded: LoadedModel, image: Image.Image, *, display_size: int = 512) -> Prepared:
    """Preprocess one image for ``loaded`` (no model work: no lock needed)."""
    tensor, frame = loaded.preprocess.prepare(image)
    return Prepared(tensor, viz.shrink(frame, display_size))  # the frame is a new image of our own


def stack(loaded: LoadedModel, prepared: Sequence[Prepared]) -> torch.Tensor:
    """The model's input batch of prepared images, on the model's device."""
    return torch.stack([p.tensor for p in prepared]).to(model_device(loaded.module))


def compute(
    loaded: LoadedModel,
    method: str,
    batch: torch.Tensor,
    targets: Sequence[Sequence[int] | None] | None = None,
    *,
    topk: int = 1,
    layer: str | None = None,
) -> Result:
    """The model work for a batch, ONE explain step (:class:`gradcam.pipeline.Explainer`): hold the
    model's lock around this call. ``targets[i]`` lists image i's classes; empty or None: its ``topk``
    best classes."""
    method_entry(method)
    named = [list(t) if t else None for t in (targets or [None] * len(batch))]
    explainer = _explainer(loaded.module, method, layer)
    return explainer.explain(batch, named, topk=[0 if t else topk for t in named])


def _heatmap(explanation: Explanation, n: int, row: int, picture: Image.Image) -> Image.Image:
    """The colormapped map of class n of image ``row``, upsampled once straight to the picture's size."""
    return viz.heatmap(explanation.map_at(n, row, (picture.height, picture.width)))


def draw(loaded: LoadedModel, pictures: Sequence[Image.Image], result: Result) -> list[ImageView]:
    """The pictures and numbers of an explained batch, drawn on each image's prepared ``picture`` (no
    model work: run it outside the lock)."""
    explanation = result.explanation
    guided = result.pictures() if registry.get(result.method).kind == "pixel" else None
    views = []
    for row, (picture, top) in enumerate(zip(pictures, result.top(5), strict=True)):
        shown = []
        for n, index in enumerate(result.wanted[row]):
            shown.append(
                TargetView(
                    index=index,
                    name=loaded.labels[index],
                    probability=float(result.probs[n, row]),
                    score=float(result.scores[n, row]),
                    heatmap=None if explanation is None else _heatmap(explanation, n, row, picture),
                    guided=viz.guided_image(guided[n, row]) if guided is not None else None,
                    raw=None if explanation is None else explanation.raw[n, row].numpy().astype(np.float32),
                )
            )
        predictions = [(i, loaded.labels[i], p) for i, p in top]
        views.append(ImageView(loaded.name, result.method, result.layer, picture, predictions, shown))
    return views


def render(
    loaded: LoadedModel,
    method: str,
    images: Sequence[Image.Image],
    targets: Sequence[Sequence[int] | None] | None = None,
    *,
    topk: int = 1,
    layer: str | None = None,
    display_size: int = 512,
) -> list[ImageView]:
    """Explain ``images`` (RGB) with ``loaded`` and ``method``, all in one batch.

    ``targets[i]`` lists image i's classes; empty or None: its ``topk`` best classes. Guided views use
    Grad-CAM's forward for the predictions and the class maps. The caller holds the model's lock
    (:meth:`gradcam.models.pool.ModelPool.lock`); a server holds it only around :func:`compute`.
    Pictures are at most ``display_size`` a side.
    """
    method_entry(method)
    if not images:
        return []
    prepared = [prepare(loaded, image, display_size=display_size) for image in images]
    computed = compute(loaded, method, stack(loaded, prepared), targets, topk=topk, layer=layer)
    return draw(loaded, [p.picture for p in prepared], computed)
