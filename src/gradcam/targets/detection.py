r"""Detection targets: one detection's score (:class:`Box`), and a detector's detections as rows
(:class:`Detections`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torchvision.ops import box_iou

from gradcam.errors import GradCAMError
from gradcam.targets.rows import TargetRows


@dataclass(frozen=True, eq=False)
class Box:
    r"""A detection: the class score of the detection of ``label`` that overlaps ``box`` most.

        y_b = s_{j*},   j* = argmax_{j : l_j = label, IoU(b_j, box) >= iou} IoU(b_j, box)

    over image b's detections (b_j, l_j, s_j) in the detector's output (torchvision's list of dicts with
    ``boxes`` (x0, y0, x1, y1) in the image's pixels, ``labels`` and ``scores``). ``label`` is one label
    or one per image, ``box`` (4,) or (B, 4). When no detection of the label overlaps the box at
    IoU >= ``iou`` the call is refused, naming the image and the best overlap. ``plus_iou=True`` adds
    IoU(b_j*, box) to the score, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does (its j* is the
    best overlap of any label, kept when its label matches).
    """

    label: int | Sequence[int] | torch.Tensor
    box: Sequence[float] | torch.Tensor
    iou: float = 0.5
    plus_iou: bool = False
    #: False: an image with no such detection scores 0 instead of being refused (the rows of
    #: :class:`Detections`, whose detections may vanish in a perturbed copy).
    required: bool = True

    def __post_init__(self) -> None:
        boxes = torch.as_tensor(self.box, dtype=torch.float32).detach()
        labels = torch.as_tensor(self.label).detach()
        if boxes.shape[-1:] != (4,) or boxes.dim() not in (1, 2):
            raise GradCAMError(f"Box box must be (x0, y0, x1, y1) or (B, 4), got {tuple(boxes.shape)}")
        if labels.dim() > 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise GradCAMError(f"Box label must be an integer or one per image, got {self.label!r}")
        object.__setattr__(self, "box", boxes)
        object.__setattr__(self, "label", labels.long())

    def _of(self, b: int) -> tuple[int, torch.Tensor]:
        label = self.label if self.label.dim() == 0 else self.label[b]
        box = self.box if self.box.dim() == 1 else self.box[b]
        return int(label), box

    def __call__(self, output: object) -> torch.Tensor:
        detections = detections_of(output)
        for given, what, single in ((self.label, "labels", 0), (self.box, "boxes", 1)):
            if given.dim() > single and len(given) != len(detections):
                raise GradCAMError(f"Box: {len(given)} {what} for {len(detections)} images")
        return torch.stack([self._score(b, found) for b, found in enumerate(detections)])

    def _score(self, b: int, found: Mapping[str, torch.Tensor]) -> torch.Tensor:
        label, box = self._of(b)
        overlap = box_iou(box[None].to(found["boxes"]), found["boxes"].detach())[0]
        if self.plus_iou:  # pytorch-grad-cam: the best overlap of any label, if its label matches
            best = int(overlap.argmax()) if len(overlap) else -1
            ok = best >= 0 and overlap[best] > self.iou and int(found["labels"][best]) == label
            if not ok:
                raise self._none(b, label, box, overlap, found)
            iou = box_iou(box[None].to(found["boxes"]), found["boxes"][best : best + 1])[0, 0]
            return found["scores"][best] + iou
        overlap = torch.where(found["labels"] == label, overlap, -1.0)
        best = int(overlap.argmax()) if len(overlap) else -1
        if best < 0 or overlap[best] < self.iou:
            if not self.required:
                return found["scores"].sum() * 0  # on the graph: a zero gradient, not none
            raise self._none(b, label, box, overlap, found)
        return found["scores"][best]

    def _none(
        self, b: int, label: int, box: torch.Tensor, overlap: torch.Tensor, found: Mapping
    ) -> GradCAMError:
        same = overlap[found["labels"] == label] if len(overlap) else overlap
        best = f"best IoU {float(same.max()):.2f}" if len(same) else "no detection of that label"
        shown = ", ".join(f"{v:.0f}" for v in box.tolist())
        return GradCAMError(
            f"Box: no detection of label {label} overlaps box [{shown}] at IoU >= {self.iou} in image {b} "
            f"({best}); lower iou= or the detector's score threshold"
        )

    def for_image(self, index: int) -> Box:
        label, box = self._of(index)
        return replace(self, label=label, box=box)


def detections_of(output: object) -> list[Mapping[str, torch.Tensor]]:
    """A detector's output checked: one mapping per image with ``boxes`` (M, 4), ``labels`` and
    ``scores`` (M,), as torchvision's detectors return in eval mode."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        output = output[1]  # torchvision scripted detectors return (losses, detections)
    ok = isinstance(output, list) and all(
        isinstance(item, Mapping) and all(k in item for k in ("boxes", "labels", "scores")) for item in output
    )
    if not ok:
        raise GradCAMError(
            f"model returned {type(output).__name__}; a detection target expects a list with one dict "
            "of boxes, labels and scores per image (torchvision's detectors in eval mode)"
        )
    return output  # type: ignore[return-value]


@dataclass(frozen=True)
class Detections:
    r"""A detector's own detections as target rows, chosen from the explained forward.

    Image b's detections with score >= ``min_score`` (of ``labels`` only, when given), best first, at
    most ``topk``; row n explains each image's n-th, by its :class:`Box` target (its own box and label,
    so y = its score s_j). An image with fewer detections repeats its last; an image with none has no
    rows of its own (``wanted`` is empty for it) and scores 0. Labels are the detector's (torchvision:
    COCO category ids, 0 the background).

    >>> explanation = GradCAM(detector)(images, targets=Detections(min_score=0.5, topk=5))
    """

    #: a chooser of rows, not a target: called once with the explained forward's output
    chooses_rows: ClassVar[bool] = True
    min_score: float = 0.5
    topk: int | None = None
    labels: Sequence[int] | None = None
    iou: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= float(self.min_score) <= 1:
            raise GradCAMError(f"min_score must be from 0 to 1, got {self.min_score!r}")
        if self.topk is not None and (
            isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1
        ):
            raise GradCAMError(f"topk must be a positive integer, got {self.topk!r}")

    def picks(self, output: object) -> list[torch.Tensor]:
        """Per image, the indices of the detections explained, best first."""
        picked = []
        for found in detections_of(output):
            keep = found["scores"].detach() >= self.min_score
            if self.labels is not None:
                keep &= torch.isin(found["labels"], torch.as_tensor(list(self.labels), device=keep.device))
            index = keep.nonzero()[:, 0]
            index = index[found["scores"].detach()[index].argsort(descending=True, stable=True)]
            picked.append(index[: self.topk] if self.topk is not None else index)
        return picked

    def __call__(self, output: object) -> TargetRows:
        found = detections_of(output)
        picks = self.picks(output)
        rows = max([len(p) for p in picks] + [1])
        targets, boxes = [], []
        for n in range(rows):
            labels, row_boxes = [], []
            for detections, pick in zip(found, picks, strict=True):
                if len(pick):
                    j = int(pick[min(n, len(pick) - 1)])
                    labels.append(int(detections["labels"][j]))
                    row_boxes.append(detections["boxes"][j].detach().float().cpu())
                else:
                    labels.append(-1)
                    row_boxes.append(torch.zeros(4))
            stacked = torch.stack(row_boxes)
            targets.append(Box(labels, stacked, iou=self.iou, required=False))
            boxes.append(stacked)
        wanted = [[int(d["labels"][j]) for j in pick] for d, pick in zip(found, picks, strict=True)]
        return TargetRows(targets, len(found), wanted=wanted, boxes=torch.stack(boxes))
