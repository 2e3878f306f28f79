r"""How much of a map lies on the object: relevance mass and rank, top-k intersection, the energy-based
pointing game.

Each takes maps (B,H,W) and a ground truth per image at the maps' size: a bool mask (B,H,W), or for the
energy-based pointing game boxes ``(x0, y0, x1, y1)`` as in :mod:`gradcam.metrics.localization`
(half-open pixel edges; a box holds the pixels whose centres lie inside it). They return (B,) float64.

Rankings use the stable order of :func:`gradcam.metrics.perturbation.salience_order`: most salient
first, equal values in raster order. Quantus sorts with NumPy's default (unstable) quicksort, so the two
agree exactly whenever the map has no ties among the pixels that decide the score; a ReLU-ed CAM's zeros
are such ties when the mask is larger than its support.

Maps are used as given (Quantus's default abs=False); pass ``maps.abs()`` for abs=True. Quantus's
``normalise`` (a division by the batch's largest |L|) changes none of these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gradcam.errors import GradCAMError
from gradcam.metrics.localization import _as_boxes
from gradcam.metrics.map_checks import map_batch, mask_batch, positive_int
from gradcam.metrics.perturbation import salience_order


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Relevance mass accuracy (Arras, Osman, Samek, "CLEVR-XAI: A benchmark dataset for the ground
    truth evaluation of neural network explanations", Information Fusion 81, 2022): the share of the
    map's mass that lies inside the ground-truth mask G,

        RMA = R_within / R_total = sum_{p in G} L_p / sum_p L_p.

    In [0, 1] for a non-negative map (higher is better); a signed map can leave it. ``masks`` (B,H,W)
    bool, none empty. NaN where a map sums to zero. Quantus 0.6: ``RelevanceMassAccuracy()`` (defaults
    abs=False, normalise=True) with ``s_batch`` = the masks.
    """
    values = map_batch(maps)
    inside = mask_batch(masks, tuple(values.shape))
    return (values * inside).flatten(1).sum(dim=1) / values.flatten(1).sum(dim=1)


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Relevance rank accuracy (Arras, Osman, Samek, Information Fusion 81, 2022): with K = |G| the
    size of the ground-truth mask and P_top-K the K most salient pixels,

        RRA = |P_top-K ∩ G| / K,

    in [0, 1], higher is better. ``masks`` (B,H,W) bool, none empty. Quantus 0.6:
    ``RelevanceRankAccuracy()`` (defaults abs=False, normalise=True) with ``s_batch`` = the masks.
    """
    values = map_batch(maps)
    inside = mask_batch(masks, tuple(values.shape)).flatten(1)
    sizes = inside.sum(dim=1)
    order = salience_order(values)
    ranked = torch.gather(inside, 1, order)
    first = torch.arange(ranked.shape[1])[None] < sizes[:, None]
    return (ranked & first).sum(dim=1).double() / sizes.double()


def top_k_intersection(maps: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    r"""Top-k intersection (Theiner, Müller-Budack, Ewerth, "Interpretable Semantic Photo
    Geolocation", WACV 2022; arXiv:2104.14995): the share of the k most salient pixels that lie in the
    ground-truth mask G,

        TKI = |P_top-k ∩ G| / k,         1 <= k <= H W,

    in [0, 1], higher is better. ``masks`` (B,H,W) bool, none empty. Quantus 0.6:
    ``TopKIntersection(k=k)`` (defaults concept_influence=False, abs=False, normalise=True).
    """
    values = map_batch(maps)
    inside = mask_batch(masks, tuple(values.shape)).flatten(1)
    k = positive_int(k, "k", most=inside.shape[1])
    top = salience_order(values)[:, :k]
    return torch.gather(inside, 1, top).sum(dim=1).double() / k


def box_masks(boxes: Sequence[object], height: int, width: int) -> torch.Tensor:
    """(B,H,W) bool: image b's pixels whose centres lie in one of ``boxes[b]`` ((M,4) or (4,) rows of
    ``(x0, y0, x1, y1)``, half-open; the convention of :func:`~gradcam.metrics.pointing_hit`)."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for b, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in _as_boxes(image_boxes).tolist():
            # Centres c + 0.5 in [x0, x1): columns ceil(x0 - 0.5) .. ceil(x1 - 0.5) - 1, clipped.
            c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), width)
            r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), height)
            if c0 < c1 and r0 < r1:
                masks[b, r0:r1, c0:c1] = True
    return masks


def energy_pointing_game(maps: torch.Tensor, boxes: Sequence[object]) -> torch.Tensor:
    r"""The energy-based pointing game (Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM:
    Score-Weighted Visual Explanations for Convolutional Neural Networks", CVPR Workshops 2020, section
    5.2): instead of the maximum only, how much of the map's energy falls inside the object's boxes,

        Proportion = sum_{p in bbox} L_p / (sum_{p in bbox} L_p + sum_{p not in bbox} L_p),

    where bbox is the union of image b's boxes (its pixels: those whose centres lie inside a box). In
    [0, 1] for a non-negative map, higher is better; NaN where a map sums to zero. ``boxes``: one entry
    per image, (M,4) or (4,) rows of ``(x0, y0, x1, y1)`` in the map's pixels, or a (B,4) or (B,M,4)
    tensor; each image's boxes must cover some pixel centre. It is :func:`relevance_mass` of the box
    mask, so Quantus 0.6 gives it as ``RelevanceMassAccuracy()`` with ``s_batch`` = that mask (B,1,H,W).
    """
    values = map_batch(maps)
    if isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim in (2, 3):
        boxes = list(boxes)  # (B, 4) or (B, M, 4): one image's boxes per row
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence) or len(boxes) != len(values):
        count = len(boxes) if isinstance(boxes, Sequence) else type(boxes).__name__
        raise GradCAMError(f"boxes must hold one entry of (M, 4) boxes per map ({len(values)}), got {count}")
    inside = box_masks(boxes, values.shape[1], values.shape[2])
    empty = torch.nonzero(~inside.flatten(1).any(dim=1)).flatten()
    if len(empty):
        raise GradCAMError(
            f"boxes[{int(empty[0])}] covers no pixel centre of the {tuple(values.shape[1:])} map; "
            "expected boxes in the map's pixel frame"
        )
    return relevance_mass(values, inside)
