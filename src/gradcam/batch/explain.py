"""Explaining one batch for every wanted class: the step the command line and every engine share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradcam.explanation import Explanation, fuse
from gradcam.methods import CAM


@dataclass
class Explainer:
    """The chosen method and options, called the same way for every batch."""

    cam: CAM
    aug_smooth: bool = False
    eigen_smooth: bool = False
    guided: bool = False

    def __call__(self, batch: torch.Tensor, targets: object = None) -> Explanation:
        result = self.cam(batch, targets, aug_smooth=self.aug_smooth, eigen_smooth=self.eigen_smooth)
        return fuse(result) if isinstance(result, list) else result


@dataclass
class BatchResult:
    """Every wanted class of every image of a batch.

    ``targets[row]`` lists image ``row``'s classes; ``explanation`` holds them as rows of an (N,B)
    grid (an image with fewer classes repeats its last one, not to be written twice); ``top5[row]`` the
    image's five best classes as (index, probability).
    """

    targets: list[list[int]]
    explanation: Explanation
    ids: torch.Tensor
    top5: list[list[tuple[int, float]]]

    def at(self, n: int, row: int) -> tuple[int, ...]:
        """Index into the explanation's tensors of image ``row``'s n-th class."""
        return (row,) if self.explanation.targets.dim() == 1 else (n, row)


def wanted_targets(
    logits: torch.Tensor, top1: torch.Tensor, targets: Sequence[int], topk: int
) -> list[list[int]]:
    """Each image's classes to explain: its top-k, then the explicit targets; its top-1 by default."""
    ranking = logits.argsort(dim=1, descending=True)
    wanted = []
    for row in range(len(top1)):
        ranked = ranking[row, :topk].tolist() if topk else []
        wanted.append(list(dict.fromkeys(ranked + list(targets))) or [int(top1[row])])
    return wanted


def target_grid(wanted: list[list[int]]) -> torch.Tensor:
    """Per-image class lists as an (N,B) grid of class ids; an image with fewer classes repeats its last
    one (that row is not written twice)."""
    rows = max(len(w) for w in wanted)
    return torch.tensor([[w[min(n, len(w) - 1)] for w in wanted] for n in range(rows)])


def explain_batch(
    explainer: Explainer, batch: torch.Tensor, targets: Sequence[int], topk: int
) -> BatchResult:
    """One forward for the top-1 maps and the logits, then (when other classes are wanted) one more
    call for every other class of every image at once."""
    first = explainer(batch)
    probabilities = first.logits.softmax(dim=1)
    top_probs, top_ids = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
    per_image = wanted_targets(first.logits, first.targets, targets, topk)
    ids = target_grid(per_image)
    many = first if ids.tolist() == [first.targets.tolist()] else explainer(batch, ids.to(batch.device))
    top5 = [
        [(int(i), float(p)) for p, i in zip(top_probs[row], top_ids[row], strict=True)]
        for row in range(len(batch))
    ]
    return BatchResult(per_image, many, ids, top5)
