"""The one explain step every front end calls: predictions, maps and guided images from one forward.

>>> explainer = Explainer(model, "gradcam", guided=True)
>>> result = explainer.explain(batch, topk=3)        # one forward/backward (and one guided forward)
>>> result.top(5)                                    # each image's 5 best classes, same forward
>>> result.explanation.maps                          # (3, B, H, W) maps of each image's 3 best classes
>>> result.guided_gradcam()                          # (3, B, C, H, W) Guided Grad-CAM

The CLI (one image or a dataset), the local and Ray engines, the service, the trust study and the
evaluation all explain through :class:`Explainer`; none of them computes a map or keeps a list of
methods (they read :mod:`gradcam.methods.registry`).

Which classes are explained: image b's classes are its ``topk`` best (``topk`` an int, or one per image),
then its named ``targets``, without repeats; its top-1 class when it has neither. Models that are no
classifiers are explained for target functions (:mod:`gradcam.targets`): ``targets`` is then one
function, a list of them (one row each), or a chooser of rows from the forward's output, as
``Detections(min_score=0.5, topk=5)`` (each image's own detections; ``topk`` does not apply).
``targets`` names classes as the CAM call does: an int for every image, a flat sequence of B ints (or a
1-D tensor) for one class per image, or one list (or None) per image for several; ``targets="all"``
explains every class. The classes are chosen from the logits of the same forward that computes the
maps, so predicting and explaining cost one pass. Results are always (N,B): row n holds each image's
n-th class, an image with fewer classes repeating its last one (:attr:`Result.wanted` says which rows
are its own).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation, fuse
from gradcam.layouts import LayoutSpec
from gradcam.methods import CAM, registry
from gradcam.methods.base import Chooser, Inputs
from gradcam.methods.guided import GuidedBackprop, guided_gradcam
from gradcam.methods.score import Progress
from gradcam.targets import model_logits
from gradcam.targets.rows import ClassRows, Rows, TargetRows

#: What ``targets`` may be: None, "all", an int, B ints (one per image), one list (or None) per image;
#: or a target function, a list of them, or a chooser of rows (``Detections``).
Targets = int | Sequence[int] | Sequence[Sequence[int] | None] | str | Callable | Sequence[Callable] | None


@dataclass(frozen=True)
class Result:
    """What one explain step gives the front ends for a batch of B images (CPU tensors, detached).

    Attributes:
        method: the registry name explained.
        layer: the explained layer(s) ("+"-joined when fused), or the attention blocks; None for
            ``guided-backprop``, which has no layer.
        wanted: per image, the classes (labels) explained, in order (row n of the tensors is class n of
            image b while n < len(wanted[b])); empty for an image with no detection to explain.
        ids: (N,B) long class explained in each row (-1 for a target function naming none).
        scores: (N,B) score y^c of each row's target (a classifier's pre-softmax score).
        probs: (N,B) its softmax (sigmoid) probability; NaN where the target has none.
        logits: (B, classes) the model's output, from the same forward; None for other models.
        explanation: the (N,B) :class:`~gradcam.Explanation` of the method (of Grad-CAM for
            ``guided-gradcam``; None for ``guided-backprop``).
        guided: (N,B,C,H,W) Guided Backpropagation gradients, when asked for (a pixel method or
            ``guided=True``), else None.
    """

    method: str
    layer: str | None
    wanted: tuple[tuple[int, ...], ...]
    ids: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor | None
    explanation: Explanation | None
    guided: torch.Tensor | None = None
    #: (N,B,4) the box (x0, y0, x1, y1, in the image's pixels) of each row's detection, for detections
    boxes: torch.Tensor | None = None
    #: (N,B,H,W) bool each row's predicted mask on the segmenter's output pixels, for segmented classes
    masks: torch.Tensor | None = None

    def top(self, k: int = 5) -> list[list[tuple[int, float]]]:
        """Each image's k best classes (fewer when the model has fewer) as (class, probability); empty
        lists for a model that is no classifier."""
        if self.logits is None:
            return [[] for _ in self.wanted]
        probabilities = self.logits.softmax(dim=1)
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [
            [(int(i), float(p)) for p, i in zip(values[row], indices[row], strict=True)]
            for row in range(len(values))
        ]

    def guided_gradcam(self) -> torch.Tensor:
        """(N,B,C,H,W) Guided Grad-CAM: the guided gradients times the Grad-CAM maps
        (:func:`gradcam.methods.guided.guided_gradcam`)."""
        if self.guided is None or self.explanation is None:
            raise GradCAMError(
                "guided-gradcam needs the guided gradients and a map: explain with guided=True"
            )
        return self._guided_gradcam

    @cached_property
    def _guided_gradcam(self) -> torch.Tensor:
        assert self.guided is not None and self.explanation is not None
        return guided_gradcam(self.guided, self.explanation.maps, self.explanation.dims)

    def pictures(self, method: str | None = None) -> torch.Tensor:
        """(N,B,C,H,W) the input-space picture of a pixel method (default: this result's): the guided
        gradients for ``guided-backprop``, Guided Grad-CAM for ``guided-gradcam``."""
        method = method or self.method
        if method == "guided-gradcam":
            return self.guided_gradcam()
        if method != "guided-backprop" or self.guided is None:
            raise GradCAMError(f"method '{method}' gives maps, not input-space pictures")
        return self.guided

    def pixel_methods(self) -> list[str]:
        """The registry's pixel methods this result has pictures for."""
        if self.guided is None:
            return []
        pixel = registry.names(["pixel"])
        return pixel if self.explanation is not None else [m for m in pixel if m == "guided-backprop"]


class Explainer:
    """A method set up once for a model, explaining batch after batch.

    Args:
        model: the classifier, left exactly as found (see :class:`gradcam.GradCAM`).
        method: a registry name that needs a model (``gradcam methods`` lists them).
        layer: None (automatic), a module name or the module, or a list (their maps are fused by the
            element-wise maximum, :func:`gradcam.explanation.fuse`).
        layout: how the layer's output reads as a feature map, when it cannot be decided.
        counterfactual: -dy/dA (gradient methods only).
        aug_smooth, eigen_smooth: as for :meth:`gradcam.GradCAM.__call__`.
        guided: also compute Guided Backpropagation (for the guided views of a CAM).
        progress: (done, total) callback of the slow methods' perturbed forwards.
        options: more keyword arguments of the method's class (``batch_size``, ``seed`` ...).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradcam",
        *,
        layer: object = None,
        layout: LayoutSpec | Sequence[LayoutSpec] = None,
        counterfactual: bool = False,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
        guided: bool = False,
        progress: Progress | None = None,
        **options: object,
    ) -> None:
        self.entry = registry.get(method, registry.names(needs_model=True))
        self.model = model
        self.aug_smooth, self.eigen_smooth = aug_smooth, eigen_smooth
        pixel = self.entry.kind == "pixel"
        self.guided = GuidedBackprop(model) if guided or pixel else None
        self.cam: CAM | None = None
        if self.entry.name != "guided-backprop":
            cam_class = registry.get("gradcam").build if pixel else self.entry.build
            settings = dict(options)
            if counterfactual:
                settings["counterfactual"] = True
            if layout is not None:
                settings["layout"] = layout
            if progress is not None:
                settings["progress"] = progress
            self.cam = cam_class(model, layer, **settings)
        elif layer is not None or counterfactual:
            raise GradCAMError(
                "guided-backprop explains the input, not a layer: give no layer or counterfactual"
            )

    @property
    def method(self) -> str:
        return self.entry.name

    @property
    def counterfactual(self) -> bool:
        return bool(self.cam is not None and self.cam.counterfactual)

    def explain(self, inputs: Inputs, targets: Targets = None, *, topk: int | Sequence[int] = 0) -> Result:
        """Explain ``inputs`` (a batch (B,C,H,W), clips (B,C,T,H,W) or a detector's list of (C,H,W)
        images) for each image's targets (module docstring): ONE forward and backward of the batch for
        the predictions and the maps, one more (guided) when asked for."""
        choose = _Recorder(_chooser(targets, topk, len(inputs)))
        explanation = None
        if self.cam is not None:
            found = self.cam.explain_rows(
                inputs, choose, aug_smooth=self.aug_smooth, eigen_smooth=self.eigen_smooth
            )
            explanation = fuse(found) if len(found) > 1 else found[0]
        guided = None
        if self.guided is not None:
            fixed = choose.rows
            scored, guided = self.guided.explain_rows(
                inputs,
                choose if fixed is None else lambda _: fixed,  # type: ignore[arg-type]
            )
        source = explanation if explanation is not None else scored
        assert choose.rows is not None
        return Result(
            method=self.method,
            layer=explanation.layer if explanation is not None else None,
            wanted=choose.rows.wanted,
            ids=source.targets if explanation is not None else scored.ids,
            scores=source.scores,
            probs=source.probs,
            logits=source.logits,
            explanation=explanation,
            guided=guided,
            boxes=None if choose.rows.boxes is None else choose.rows.boxes.detach().float().cpu(),
            masks=choose.rows.masks,
        )


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str = "gradcam",
    targets: Targets = None,
    *,
    topk: int | Sequence[int] = 0,
    **settings: object,
) -> Result:
    """``Explainer(model, method, **settings).explain(inputs, targets, topk=topk)`` in one call. Keep an
    :class:`Explainer` for batch after batch: it remembers the automatic layer."""
    return Explainer(model, method, **settings).explain(inputs, targets, topk=topk)  # type: ignore[arg-type]


class _Recorder:
    """A chooser that remembers the rows it chose last (the per-image ``wanted``, the boxes)."""

    def __init__(self, choose: Chooser) -> None:
        self.choose = choose
        self.rows: Rows | None = None

    def __call__(self, output: object) -> Rows:
        self.rows = self.choose(output)
        return self.rows


class _Chooser:
    """The (N,B) classes of a batch from its logits, by the rule of the module docstring."""

    def __init__(self, named: list[list[int]] | None, topk: list[int], batch: int) -> None:
        self.named, self.topk, self.batch = named, topk, batch

    def __call__(self, output: object) -> ClassRows:
        logits = model_logits(output, self.batch).detach()
        classes = logits.shape[1]
        if self.named is None:  # "all"
            wanted = tuple(tuple(range(classes)) for _ in range(self.batch))
        else:
            for k in self.topk:
                if not 0 <= k <= classes:
                    raise GradCAMError(f"topk must be from 0 to {classes} (the model's classes), got {k}")
            for wanted in self.named:
                bad = [c for c in wanted if not 0 <= c < classes]
                if bad:
                    raise GradCAMError(f"target class {bad[0]} is out of range; expected 0..{classes - 1}")
            ranking = logits.argsort(dim=1, descending=True)[:, : max(self.topk, default=0)].tolist()
            top1 = logits.argmax(dim=1).tolist()
            wanted = tuple(
                tuple(dict.fromkeys(ranking[b][: self.topk[b]] + self.named[b])) or (top1[b],)
                for b in range(self.batch)
            )
        rows = max(len(w) for w in wanted)
        grid = [[w[min(n, len(w) - 1)] for w in wanted] for n in range(rows)]
        return ClassRows(torch.tensor(grid, dtype=torch.long, device=logits.device), self.batch, wanted)


def _is_function(value: object) -> bool:
    return callable(value) and not isinstance(value, (torch.Tensor, str))


def _function_chooser(targets: object, topk: int | Sequence[int], batch: int) -> Chooser | None:
    """The chooser of target functions (a function, a list of them, a chooser of rows), or None."""
    listed = isinstance(targets, (list, tuple)) and bool(targets) and all(map(_is_function, targets))
    if not (_is_function(targets) or listed):
        return None
    if topk if _is_class(topk) else any(topk):  # type: ignore[arg-type]
        raise GradCAMError(
            "topk chooses a classifier's classes; with target functions give the rows themselves "
            "(Detections(topk=...) for a detector's detections)"
        )
    if getattr(targets, "chooses_rows", False):  # Detections, SegmentedClasses: from the forward
        return targets  # type: ignore[return-value]
    functions = list(targets) if listed else [targets]  # type: ignore[arg-type]
    return lambda output: TargetRows(functions, batch)


def _chooser(targets: Targets, topk: int | Sequence[int], batch: int) -> Chooser:
    functions = _function_chooser(targets, topk, batch)
    if functions is not None:
        return functions
    if isinstance(targets, str):
        if targets != "all":
            raise GradCAMError(
                f"targets must be None, 'all', class indices or one list per image, got {targets!r}"
            )
        return _Chooser(None, [0] * batch, batch)
    return _Chooser(_named(targets, batch), _per_image_topk(topk, batch), batch)


def _is_class(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _named(targets: Targets, batch: int) -> list[list[int]]:
    """Each image's named classes: an int for every image, B ints one per image, one list per image."""
    if targets is None:
        return [[] for _ in range(batch)]
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() > 1:
            raise GradCAMError(
                f"targets tensor must be 0-D or 1-D integer, got {targets.dtype} {tuple(targets.shape)}"
            )
        targets = targets.tolist()
    if _is_class(targets):
        return [[int(targets)] for _ in range(batch)]  # type: ignore[arg-type]
    if not isinstance(targets, Sequence):
        raise GradCAMError(
            f"targets must be None, 'all', class indices or one list per image, got {targets!r}"
        )
    items = list(targets)
    if len(items) != batch:
        raise GradCAMError(f"got targets for {len(items)} images in a batch of {batch}; expected {batch}")
    named = []
    for item in items:
        classes = [] if item is None else [item] if _is_class(item) else list(item)  # type: ignore[arg-type]
        bad = [c for c in classes if not _is_class(c)]
        if bad:
            raise GradCAMError(f"targets must be integer class indices, got {bad[0]!r}")
        named.append([int(c) for c in classes])
    return named


def _per_image_topk(topk: int | Sequence[int], batch: int) -> list[int]:
    values = [topk] * batch if _is_class(topk) else list(topk)  # type: ignore[arg-type]
    if len(values) != batch or not all(_is_class(k) for k in values):
        raise GradCAMError(f"topk must be an integer or one integer per image, got {topk!r}")
    return [int(k) for k in values]


__all__ = ["Explainer", "Progress", "Result", "Targets", "explain"]
