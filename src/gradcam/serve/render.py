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

from gradcam import methods, viz
from gradcam.batch.explain import target_grid
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation
from gradcam.methods import CAM, registry
from gradcam.methods.guided import GuidedBackprop
from gradcam.models import LoadedModel, model_device

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


# CAM objects remember the automatically found layer per input shape: keep one per model, method and
# layer for as long as the model lives.
_cams: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str | None], CAM]] = weakref.WeakKeyDictionary()


def _cam(module: nn.Module, method: str, layer: str | None) -> CAM:
    cached = _cams.setdefault(module, {})
    key = (method, layer)
    if key not in cached:
        cached[key] = methods.get(method)(module, layer)
    return cached[key]


def _explain(
    cam: CAM, batch: torch.Tensor, targets: Sequence[Sequence[int]], topk: int
) -> tuple[Explanation, list[list[int]]]:
    """An (N,B) explanation of every wanted class and the wanted lists. One call when every image names
    its classes or all want their top-1; otherwise a top-1 call first (its logits rank the classes)."""
    if all(targets):
        wanted = [list(dict.fromkeys(t)) for t in targets]
        return cam(batch, target_grid(wanted).to(batch.device)), wanted
    first = cam(batch)
    ranking = first.logits.argsort(dim=1, descending=True)
    wanted = [list(dict.fromkeys(t)) or ranking[row, :topk].tolist() for row, t in enumerate(targets)]
    ids = target_grid(wanted)
    if ids.tolist() == [first.targets.tolist()]:
        return first.rows(), wanted
    return cam(batch, ids.to(batch.device)), wanted


def _display(picture: Image.Image, size: int) -> Image.Image:
    if size and max(picture.size) > size:
        picture = picture.copy()
        picture.thumbnail((size, size), Image.Resampling.BILINEAR)
    return picture


@dataclass
class Computed:
    """What the model produced for a batch, before any picture is drawn."""

    method: str
    explanation: Explanation  # (N,B) rows of wanted classes
    wanted: list[list[int]]
    guided: torch.Tensor | None  # (N,B,C,H,W) for the guided views


@dataclass
class Prepared:
    """One image as a model needs it: its input tensor and the frame picture its maps are drawn on (at
    most ``display_size`` a side). The image itself can be dropped once this is made."""

    tensor: torch.Tensor
    picture: Image.Image


def prepare(loaded: LoadedModel, image: Image.Image, *, display_size: int = 512) -> Prepared:
    """Preprocess one image for ``loaded`` (no model work: no lock needed)."""
    return Prepared(loaded.preprocess(image), _display(loaded.preprocess.frame(image), display_size))


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
) -> Computed:
    """The model work for a batch: hold the model's lock around this call."""
    entry = method_entry(method)
    if not 1 <= topk <= len(loaded.labels):
        raise GradCAMError(f"topk must be between 1 and {len(loaded.labels)}, got {topk}")
    wanted_in = [list(t) if t else [] for t in (targets or [None] * len(batch))]
    for classes in wanted_in:
        for index in classes:
            if not 0 <= index < len(loaded.labels):
                raise GradCAMError(
                    f"target {index} is out of range: the model has {len(loaded.labels)} classes"
                )
    guided_view = entry.kind == "pixel"
    cam = _cam(loaded.module, "gradcam" if guided_view else method, layer)
    explanation, wanted = _explain(cam, batch, wanted_in, topk)
    guided = None
    if guided_view:
        backprop = GuidedBackprop(loaded.module)
        guided = torch.stack([backprop(batch, row.tolist()) for row in explanation.targets])  # (N,B,C,H,W)
        if method == "guided-gradcam":
            guided = guided * explanation.maps[:, :, None].to(guided.dtype)
    return Computed(method, explanation, wanted, guided)


def draw(loaded: LoadedModel, pictures: Sequence[Image.Image], computed: Computed) -> list[ImageView]:
    """The pictures and numbers of a computed batch, drawn on each image's prepared ``picture`` (no model
    work: run it outside the lock)."""
    explanation, guided, method = computed.explanation, computed.guided, computed.method
    probabilities = explanation.logits.softmax(dim=1)
    top_p, top_i = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
    cam_view = method != "guided-backprop"
    views = []
    for row, picture in enumerate(pictures):
        shown = []
        for n, index in enumerate(computed.wanted[row]):
            saliency = explanation.maps[n, row]
            shown.append(
                TargetView(
                    index=index,
                    name=loaded.labels[index],
                    probability=float(explanation.probs[n, row]),
                    score=float(explanation.scores[n, row]),
                    heatmap=viz.overlay(picture, saliency, alpha=1.0) if cam_view else None,
                    guided=viz.guided_image(guided[n, row]) if guided is not None else None,
                    raw=explanation.raw[n, row].numpy().astype(np.float32) if cam_view else None,
                )
            )
        predictions = [
            (int(i), loaded.labels[int(i)], float(p)) for p, i in zip(top_p[row], top_i[row], strict=True)
        ]
        views.append(ImageView(loaded.name, method, explanation.layer, picture, predictions, shown))
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
