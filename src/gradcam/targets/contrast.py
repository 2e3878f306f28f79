"""A class against the classes the model finds most like it (Finer-CAM's target)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradcam.errors import GradCAMError
from gradcam.targets.classes import model_logits
from gradcam.targets.rows import ClassRows

#: Finer-CAM's default comparison: the first, second and third most similar classes.
COMPARED = (1, 2, 3)


class ContrastRows(ClassRows):
    r"""Each row's class c against the classes j whose logits are nearest to y^c (Zhang et al.,
    "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation", CVPR 2025):

        y = sum_j p_j (y^c - alpha y^j) / sum_j p_j,     p = softmax(y)

    over j in ``compared``: the ranks (1 = most similar) of the classes sorted by |y^j - y^c|, rank 0
    being c itself (ties keep the class order). The weights p_j are part of the score (pytorch-grad-cam's
    ``FinerWeightedTarget``, by the paper's authors), so its gradient flows through them too. ``alpha`` =
    0 is plain Grad-CAM of c; larger values take away what c shares with its neighbours. The compared
    classes are chosen on the explained forward and kept for every perturbed copy of an image.
    """

    def __init__(self, rows: ClassRows, logits: torch.Tensor, compared: Sequence[int], alpha: float) -> None:
        super().__init__(rows.ids, rows.batch, rows.wanted)
        self.alpha = float(alpha)
        classes = logits.shape[-1]
        bad = [r for r in compared if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < classes]
        if not compared or bad:
            raise GradCAMError(f"compared must be ranks from 1 to {classes - 1}, got {list(compared)!r}")
        own = logits.detach().gather(1, self.ids.T).T  # (N, B)
        distance = (logits.detach()[None] - own[..., None]).abs()  # (N, B, classes)
        order = torch.argsort(distance, dim=-1, stable=True)
        self.compared = order[..., list(compared)]  # (N, B, m)

    def _contrast(
        self, logits: torch.Tensor, own: torch.Tensor, compared: torch.Tensor, rows: tuple
    ) -> torch.Tensor:
        """The score of each row from ``own`` logits y^c and the ``compared`` classes, read from
        ``logits[rows + (compared,)]``."""
        weights = logits.softmax(dim=-1)[rows + (compared,)]
        differences = own[..., None] - self.alpha * logits[rows + (compared,)]
        return (weights * differences).sum(-1) / (weights.sum(-1) + 1e-9)

    def scores(self, output: object) -> torch.Tensor:
        logits = self.logits(output)  # (B, classes)
        images = torch.arange(self.batch, device=logits.device)[None, :, None]
        own = logits.gather(1, self.ids.T).T  # (N, B)
        return self._contrast(logits, own, self.compared, (images,))

    def image_scores(self, index: int, output: object, probability: bool = False) -> torch.Tensor:
        if probability:
            return super().image_scores(index, output, probability)
        logits = model_logits(output)  # (n copies, classes)
        copies = torch.arange(len(logits), device=logits.device)[:, None, None]
        own = logits[:, self.ids[:, index]]  # (n, N)
        return self._contrast(logits, own, self.compared[:, index][None], (copies,))


class ResidualSoftmaxRows(ClassRows):
    r"""The residual softmax target (ReST) of Cai, "CAMs as Shapley Value-based Explainers", 2025: the
    pre-softmax score plus the log of the post-softmax one,

        y = y^c + log softmax(y)_c = 2 y^c - log sum_j exp(y^j)

    (pytorch-grad-cam's ``ClassifierOutputReST``: y^c minus the cross-entropy of class c). Unlike the
    logit alone it is curved in the activations, so second-order methods (Shapley-CAM) see more than
    the gradient.
    """

    def __init__(self, rows: ClassRows) -> None:
        super().__init__(rows.ids, rows.batch, rows.wanted)

    def scores(self, output: object) -> torch.Tensor:
        logits = self.logits(output)
        return 2 * logits.gather(1, self.ids.T).T - torch.logsumexp(logits, dim=1)[None]

    def image_scores(self, index: int, output: object, probability: bool = False) -> torch.Tensor:
        if probability:
            return super().image_scores(index, output, probability)
        logits = model_logits(output)
        return 2 * logits[:, self.ids[:, index]] - torch.logsumexp(logits, dim=1, keepdim=True)
