"""One batch of images through one model and method, as the pictures and numbers the service returns.

Any method of :mod:`gradcam.methods.registry` that needs a model: the CAM and attention methods, and the
two guided views of the Grad-CAM paper (Selvaraju et al., ICCV 2017, section 3.1), ``guided-backprop``
(Springenberg et al. 2015) and ``guided-gradcam``, the element-wise product of Guided Backpropagation and
the upsampled Grad-CAM map. Images in one call may want different classes: they are explained together,
one forward for all of them (see :func:`render`). A class map is sent as a colormapped heatmap at the
picture's size; the browser draws it over the picture at the opacity the user picks.

Segmenters and detectors are explained through the same step, their targets chosen by the dataset
engines' rule (:func:`gradcam.batch.core.task_targets`): a segmenter's named classes or its largest
predicted class, a detector's detections scoring at least ``min_score`` (of the named classes only, when
given). Their numbers are the manifest's (:func:`gradcam.batch.core.task_fields`): a detection's box in
the image's pixels, a segmented class's predicted mask (sent as a PNG) with its area; the browser draws
the boxes and outlines, never the heatmap.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from gradcam import viz
from gradcam.batch import core
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation
from gradcam.methods import registry
from gradcam.methods.base import Inputs
from gradcam.models import LoadedModel, model_device
from gradcam.models.torchvision_tasks import set_score_threshold
from gradcam.pipeline import Explainer, Result, Targets

#: The hint for a slow method a server does not offer.
SLOW_HINT = " (enabled with --slow-methods)"
#: The tasks the service explains: the models of single images (a video model explains clips).
IMAGE_TASKS = ("classification", "segmentation", "detection")
#: Most targets one image may have explained (classes, segmented classes or detections).
MAX_TARGETS = 10
#: A detector's default ``min_score``.
MIN_SCORE = 0.5


def default_topk(task: str) -> int:
    """How many targets an image gets when a request names none: a classifier's best class, a
    segmenter's largest predicted class, a detector's detections up to :data:`MAX_TARGETS`."""
    return MAX_TARGETS if task == "detection" else 1


def check_task(loaded: LoadedModel, method: str) -> None:
    """Refuse what the service cannot explain with ``loaded``: a video model (clips, not images), and the
    guided pictures of a detector (they differentiate an input batch; a detector takes a list of
    images)."""
    if loaded.task not in IMAGE_TASKS:
        raise GradCAMError(
            f"model '{loaded.name}' is a {loaded.task} model; the service explains images "
            f"({', '.join(IMAGE_TASKS)} models)"
        )
    if loaded.task == "detection" and registry.get(method).kind == "pixel":
        raise GradCAMError(
            f"method '{method}' differentiates an input batch, which a detector's list of images has "
            "not; choose a CAM method"
        )


def empty_reason(task: str, min_score: float, named: Sequence[int] = ()) -> str | None:
    """Why an image of a segmenter or detector has no target to explain (None: a classifier, whose
    images always have one)."""
    if task == "classification":
        return None
    if task == "detection":
        among = " among the named classes" if named else ""
        return f"no detection scored at least {min_score:g}{among}"
    return "the segmenter predicts no class but the background"


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
    probability: float | None  # None: the target has no probability (segmenters, detectors)
    score: float
    heatmap: Image.Image | None  # the colormapped map at the picture's size (None: guided-backprop)
    guided: Image.Image | None  # the guided-backprop / guided-gradcam picture, in the model's input view
    raw: np.ndarray | None  # the map at the layer's resolution (None: guided-backprop)
    detection: dict | None = None  # a detection's index, box (in the image's pixels) and score
    mask: dict | None = None  # a segmented class's mask area and fraction
    mask_picture: Image.Image | None = None  # its predicted mask, "L" 255 inside, on the output's pixels


@dataclass
class ImageView:
    """One image explained: its picture (the frame the maps register with), top-5 and targets."""

    model: str
    method: str
    layer: str | None
    picture: Image.Image
    predictions: list[tuple[int, str, float]]
    targets: list[TargetView]
    task: str = "classification"
    none: str | None = None  # why an image of a segmenter or detector has no targets


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
    """One image as a model needs it: its input tensor, the frame picture its maps are drawn on (at
    most ``display_size`` a side) and the (W, H) of the image. The image itself can be dropped once this
    is made."""

    tensor: torch.Tensor
    picture: Image.Image
    size: tuple[int, int] = (0, 0)


def prepare(loaded: LoadedModel, image: Image.Image, *, display_size: int = 512) -> Prepared:
    """Preprocess one image for ``loaded`` (no model work: no lock needed)."""
    tensor, frame = loaded.preprocess.prepare(image)
    return Prepared(tensor, viz.shrink(frame, display_size), image.size)  # the frame is our own image


def stack(loaded: LoadedModel, prepared: Sequence[Prepared]) -> Inputs:
    """The model's inputs of prepared images (of one size), on the model's device: a (B,C,H,W) batch,
    or a detector's list of images."""
    device = model_device(loaded.module)
    if loaded.task == "detection":
        return [p.tensor.to(device) for p in prepared]
    return torch.stack([p.tensor for p in prepared]).to(device)


def _task_targets(
    loaded: LoadedModel,
    explainer: Explainer,
    named: Sequence[Sequence[int] | None],
    topk: int,
    min_score: float,
) -> tuple[Targets, int]:
    """The targets of a segmenter's or detector's batch, by the dataset engines' rule
    (:func:`gradcam.batch.core.task_targets`); every image names the same classes."""
    shared = {tuple(classes or ()) for classes in named}
    if len(shared) != 1:
        raise GradCAMError("a segmenter's or detector's batch explains the same classes for every image")
    job = core.Job(
        loaded=loaded, explainer=explainer, out=Path(), targets=shared.pop(), topk=topk, min_score=min_score
    )
    return core.task_targets(job, len(named))


@contextmanager
def _score_threshold(loaded: LoadedModel, min_score: float) -> Iterator[None]:
    """A detector's own score threshold lowered to ``min_score`` for the call (when higher), then put
    back: detections down to ``min_score`` come out, and the model is left as found."""
    owner = getattr(loaded.module, "roi_heads", loaded.module)
    before = getattr(owner, "score_thresh", None)
    changed = loaded.task == "detection" and set_score_threshold(loaded.module, min_score)
    try:
        yield
    finally:
        if changed:
            owner.score_thresh = before


def compute(
    loaded: LoadedModel,
    method: str,
    batch: Inputs,
    targets: Sequence[Sequence[int] | None] | None = None,
    *,
    topk: int = 1,
    layer: str | None = None,
    min_score: float = MIN_SCORE,
) -> Result:
    """The model work for a batch, ONE explain step (:class:`gradcam.pipeline.Explainer`): hold the
    model's lock around this call. ``targets[i]`` lists image i's classes; empty or None: its ``topk``
    best classes. For a segmenter or detector every image names the same classes (the classes
    explained, or the detections' classes), chosen as :func:`_task_targets` says; a detector explains
    its detections scoring at least ``min_score``, at most ``topk``."""
    method_entry(method)
    check_task(loaded, method)
    named = [list(t) if t else None for t in (targets or [None] * len(batch))]
    explainer = _explainer(loaded.module, method, layer)
    if loaded.task == "classification":
        return explainer.explain(batch, named, topk=[0 if t else topk for t in named])
    chosen, k = _task_targets(loaded, explainer, named, topk, min_score)
    with _score_threshold(loaded, min_score):
        return explainer.explain(batch, chosen, topk=k)


def _heatmap(explanation: Explanation, n: int, row: int, picture: Image.Image) -> Image.Image:
    """The colormapped map of class n of image ``row``, upsampled once straight to the picture's size."""
    return viz.heatmap(explanation.map_at(n, row, (picture.height, picture.width)))


def _target(
    loaded: LoadedModel, result: Result, guided: torch.Tensor | None, n: int, row: int, prepared: Prepared
) -> TargetView:
    """Target n of image ``row``: its numbers, its map drawn on the prepared picture, and a segmented
    class's mask as a picture."""
    explanation, index = result.explanation, result.wanted[row][n]
    probability = float(result.probs[n, row])
    fields = core.task_fields(result, n, row, prepared.size)
    mask = None
    if result.masks is not None:
        mask = Image.fromarray(result.masks[n, row].numpy().astype(np.uint8) * 255)  # mode "L"
    return TargetView(
        index=index,
        name=core.label_name(loaded.labels, index) or str(index),
        probability=None if math.isnan(probability) else probability,
        score=float(result.scores[n, row]),
        heatmap=None if explanation is None else _heatmap(explanation, n, row, prepared.picture),
        guided=viz.guided_image(guided[n, row]) if guided is not None else None,
        raw=None if explanation is None else explanation.raw[n, row].numpy().astype(np.float32),
        detection=fields.get("detection"),
        mask=fields.get("mask"),
        mask_picture=mask,
    )


def draw(
    loaded: LoadedModel, prepared: Sequence[Prepared], result: Result, *, reason: str | None = None
) -> list[ImageView]:
    """The pictures and numbers of an explained batch, drawn on each image's prepared ``picture`` (no
    model work: run it outside the lock). ``reason`` says why an image of a segmenter or detector has
    no target (:func:`empty_reason`)."""
    guided = result.pictures() if registry.get(result.method).kind == "pixel" else None
    views = []
    for row, (item, top) in enumerate(zip(prepared, result.top(5), strict=True)):
        shown = [_target(loaded, result, guided, n, row, item) for n in range(len(result.wanted[row]))]
        predictions = [(i, loaded.labels[i], p) for i, p in top]
        none = reason if not shown else None
        views.append(
            ImageView(
                loaded.name, result.method, result.layer, item.picture, predictions, shown, loaded.task, none
            )
        )
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
    min_score: float = MIN_SCORE,
) -> list[ImageView]:
    """Explain ``images`` (RGB) with ``loaded`` and ``method``, one batch per input size (a
    classifier's inputs have one; a segmenter's and a detector's keep the image's shape).

    ``targets[i]`` lists image i's classes; empty or None: its ``topk`` best classes (see
    :func:`compute` for segmenters and detectors). Guided views use Grad-CAM's forward for the
    predictions and the class maps. The caller holds the model's lock
    (:meth:`gradcam.models.pool.ModelPool.lock`); a server holds it only around :func:`compute`.
    Pictures are at most ``display_size`` a side.
    """
    method_entry(method)
    if not images:
        return []
    prepared = [prepare(loaded, image, display_size=display_size) for image in images]
    wanted = list(targets or [None] * len(images))
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, item in enumerate(prepared):
        groups.setdefault(tuple(item.tensor.shape), []).append(row)
    views: list[ImageView] = [None] * len(prepared)  # type: ignore[list-item]
    for rows in groups.values():
        part = [prepared[r] for r in rows]
        named = [wanted[r] for r in rows]
        computed = compute(
            loaded, method, stack(loaded, part), named, topk=topk, layer=layer, min_score=min_score
        )
        reason = empty_reason(loaded.task, min_score, named[0] or ())
        for row, view in zip(rows, draw(loaded, part, computed, reason=reason), strict=True):
            views[row] = view
    return views
