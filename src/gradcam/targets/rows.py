"""The targets chosen for a batch, as (N,B) rows: what every method differentiates or scores.

Row n holds one target for every image b. A method's engine runs one forward, asks its chooser for the
rows from that forward's output (a classifier's classes are chosen from its logits, a detector's
detections from its detections) and then reads, for each row and image:

* ``scores(output)`` (N,B): the differentiable score y (the gradient methods differentiate it);
* ``image_scores(b, output)`` (n, N): the rows' scores of image b on the outputs of n perturbed copies
  of it (Score-CAM, Ablation-CAM);
* ``ids`` (N,B): the class or label a row names (-1 for none), and ``probs(output)`` (N,B): the softmax
  (or sigmoid) probability of that class, NaN where a target has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradcam.errors import GradCAMError
from gradcam.targets.classes import model_logits


@dataclass(frozen=True)
class Scored:
    """What the rows gave on the explained forward, detached and on the CPU."""

    ids: torch.Tensor  # (N,B) long
    scores: torch.Tensor  # (N,B)
    probs: torch.Tensor  # (N,B), NaN where a target has no probability
    logits: torch.Tensor | None  # (B, classes) for a classifier, else None
    boxes: torch.Tensor | None = None  # (N,B,4) for detections
    masks: torch.Tensor | None = None  # (N,B,H,W) bool, predicted masks of segmented classes


class Rows:
    """Base of the chosen rows: see the module docstring."""

    ids: torch.Tensor
    #: per image, the ids of its own rows in order (later rows of an image with fewer repeat its last)
    wanted: tuple[tuple[int, ...], ...]
    #: (N,B,4) each row's detection box (x0, y0, x1, y1) in the image's pixels, for detections
    boxes: torch.Tensor | None = None
    #: (N,B,H,W) bool each row's predicted mask on the output's pixels, for segmented classes
    masks: torch.Tensor | None = None

    def scores(self, output: object) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, output: object) -> torch.Tensor:
        raise NotImplementedError

    def image_scores(self, index: int, output: object, probability: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, output: object) -> torch.Tensor | None:
        return None

    def scored(self, output: object, scores: torch.Tensor | None = None) -> Scored:
        """The rows' :class:`Scored` on ``output`` (``scores`` when already computed)."""
        scores = self.scores(output) if scores is None else scores
        logits = self.logits(output)
        boxes = None if self.boxes is None else self.boxes.detach().float().cpu()
        return Scored(
            ids=self.ids.cpu(),
            scores=scores.detach().float().cpu(),
            probs=self.probs(output).detach().float().cpu(),
            logits=None if logits is None else logits.detach().float().cpu(),
            boxes=boxes,
            masks=self.masks,
        )


class ClassRows(Rows):
    """A classifier's classes: y = the class's logit y^c, p = its softmax probability."""

    def __init__(self, ids: torch.Tensor, batch: int, wanted: Sequence[Sequence[int]] | None = None) -> None:
        self.ids, self.batch = ids, batch
        self.wanted = tuple(tuple(w) for w in wanted) if wanted is not None else _own(ids)

    def logits(self, output: object) -> torch.Tensor:
        return model_logits(output, self.batch)

    def scores(self, output: object) -> torch.Tensor:
        return self.logits(output).gather(1, self.ids.T).T

    def probs(self, output: object) -> torch.Tensor:
        return self.logits(output).softmax(dim=1).gather(1, self.ids.T).T

    def image_scores(self, index: int, output: object, probability: bool = False) -> torch.Tensor:
        logits = model_logits(output)
        values = logits.softmax(dim=1) if probability else logits
        return values[:, self.ids[:, index]]


class TargetRows(Rows):
    """Rows of target functions (:mod:`gradcam.targets.functions`), each a callable output -> (B,).

    ``probability`` is ignored by :meth:`image_scores`: a target's score is used as it is.
    """

    def __init__(
        self,
        targets: Sequence[Callable[[object], torch.Tensor]],
        batch: int,
        *,
        wanted: Sequence[Sequence[int]] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> None:
        if not targets:
            raise GradCAMError("targets is an empty list; expected at least one target")
        bad = [t for t in targets if not callable(t)]
        if bad:
            raise GradCAMError(f"a target must be a class index or a callable, got {type(bad[0]).__name__}")
        self.targets, self.batch, self.boxes, self.masks = list(targets), batch, boxes, masks
        self.ids = torch.stack([_labels(t, batch) for t in self.targets])
        self.wanted = tuple(tuple(w) for w in wanted) if wanted is not None else _own(self.ids)

    def _stack(self, values: list[torch.Tensor], count: int) -> torch.Tensor:
        for target, value in zip(self.targets, values, strict=True):
            if not isinstance(value, torch.Tensor) or value.shape != (count,):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                name = getattr(target, "__name__", type(target).__name__)
                raise GradCAMError(
                    f"target {name} returned {got}; expected one score per image, shape ({count},)"
                )
        return torch.stack(values)

    def scores(self, output: object) -> torch.Tensor:
        return self._stack([target(output) for target in self.targets], self.batch)

    def probs(self, output: object) -> torch.Tensor:
        rows = []
        for target in self.targets:
            probability = getattr(target, "probability", None)
            rows.append(probability(output) if probability else torch.full((self.batch,), float("nan")))
        return torch.stack([row.detach().float().cpu() for row in rows])

    def image_scores(self, index: int, output: object, probability: bool = False) -> torch.Tensor:
        own = [getattr(t, "for_image", None) for t in self.targets]
        targets = [f(index) if f is not None else t for f, t in zip(own, self.targets, strict=True)]
        values = [target(output) for target in targets]
        count = len(values[0]) if isinstance(values[0], torch.Tensor) and values[0].dim() == 1 else 0
        return self._stack(values, count).T


def _labels(target: object, batch: int) -> torch.Tensor:
    label = getattr(target, "label", -1)
    ids = torch.as_tensor(label if label is not None else -1, dtype=torch.long).detach().cpu()
    return ids.expand(batch).clone() if ids.dim() == 0 else ids.reshape(batch)


def _own(ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in column) for column in ids.T.cpu())
