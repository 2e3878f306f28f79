r"""Where the map points: the Grad-CAM paper's box, localisation accuracy and error, the pointing game.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates with half-open extent, as in torchvision:
pixel (row r, column c) covers [c, c+1) x [r, r+1), so the box of columns 3..5 is x0 = 3, x1 = 6, and
a box's area is (x1 - x0) (y1 - y0). PASCAL VOC / ImageNet XML boxes, which count pixels from 1 with
inclusive ends, are converted on reading (x0 = xmin - 1, x1 = xmax).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import box_iou

from gradcam.errors import GradCAMError
from gradcam.metrics.checks import as_map

#: The Grad-CAM paper's binarisation threshold, a fraction of each map's maximum.
BOX_THRESHOLD = 0.15
#: The ILSVRC localisation criterion: a box is correct when its IoU with a ground-truth box is at least this.
IOU_THRESHOLD = 0.5
#: TorchRay's pointing-game tolerance, in pixels of the image the map is laid over.
POINTING_TOLERANCE = 15.0

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_boxes(boxes: object) -> torch.Tensor:
    tensor = torch.as_tensor(boxes, dtype=torch.float64)
    if tensor.dim() == 1 and tensor.numel() == 4:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        raise GradCAMError(f"boxes must be (x0, y0, x1, y1) rows, shape (M, 4); got {tuple(tensor.shape)}")
    return tensor


def boxes_from_map(saliency: torch.Tensor | np.ndarray, threshold: float = BOX_THRESHOLD) -> torch.Tensor:
    r"""The Grad-CAM paper's box around a map (Selvaraju et al., ICCV 2017, section 4.1).

    Binarise at a fraction of the map's maximum, M = [L >= threshold * max L], take the largest
    8-connected segment of M (most pixels; the first in raster order on a tie) and return its bounding
    box ``(x0, y0, x1, y1)`` (float64, half-open pixel edges).

    ``saliency`` is (H, W) or a stack (..., H, W); the result is (4,) or (..., 4). A map whose maximum is
    not positive has no salient region: its box is the whole image (every pixel passes the threshold).
    """
    if not 0.0 <= threshold <= 1.0:
        raise GradCAMError(f"threshold must lie in [0, 1], got {threshold}")
    tensor = torch.as_tensor(saliency)
    if tensor.dim() > 2:
        stacked = [boxes_from_map(one, threshold) for one in tensor.reshape(-1, *tensor.shape[-2:])]
        return torch.stack(stacked).reshape(*tensor.shape[:-2], 4)
    array = as_map(saliency)
    peak = array.max()
    # as_map works in float64: 0.15 rounded to float32 is above 0.15 and would drop pixels at exactly 15%.
    mask = array >= threshold * peak if peak > 0 else np.ones_like(array, dtype=bool)
    labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    largest = int(np.argmax(np.bincount(labelled.ravel(), minlength=count + 1)[1:])) + 1
    rows, cols = ndimage.find_objects(labelled, max_label=largest)[largest - 1]
    return torch.tensor([cols.start, rows.start, cols.stop, rows.stop], dtype=torch.float64)


def iou(box: object, boxes: object) -> torch.Tensor:
    """Intersection over union of ``box`` (4,) with each of ``boxes`` (M, 4): (M,) float64."""
    return box_iou(_as_boxes(box), _as_boxes(boxes))[0]


def localization_hit(
    saliency: torch.Tensor | np.ndarray,
    boxes: object,
    *,
    threshold: float = BOX_THRESHOLD,
    min_iou: float = IOU_THRESHOLD,
) -> bool:
    """True when the map's box (:func:`boxes_from_map`) overlaps some ground-truth box of the class
    with IoU >= ``min_iou`` (the ILSVRC criterion). ``boxes`` (M, 4) are in the map's pixel frame. A map
    with no positive value localises nothing (as it points nowhere in :func:`pointing_hit`)."""
    truth = _as_boxes(boxes)
    if len(truth) == 0 or as_map(saliency).max() <= 0:
        return False
    return bool((iou(boxes_from_map(saliency, threshold), truth) >= min_iou).any())


def pointing_hit(
    saliency: torch.Tensor | np.ndarray, boxes: object, *, tolerance: float = POINTING_TOLERANCE
) -> bool:
    r"""The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 /
    IJCV 2018), with TorchRay's tolerance.

    The map's maximum p (the first in raster order on a tie) is a hit when some pixel q of a ground-truth
    box of the class lies within the tolerance: ||p - q|| < tolerance, distances between pixel indices
    (with tolerance 0: when p itself lies in a box). A box's pixels are those whose centres lie inside
    it (half-open: a centre on the right or bottom edge is outside). A map with no positive value points
    nowhere and misses.
    """
    if tolerance < 0:
        raise GradCAMError(f"tolerance must be >= 0 pixels, got {tolerance}")
    array = as_map(saliency)
    truth = _as_boxes(boxes)
    if array.max() <= 0 or len(truth) == 0:
        return False
    row, col = np.unravel_index(int(np.argmax(array)), array.shape)
    for x0, y0, x1, y1 in truth.tolist():
        # The box's pixels have centres c + 0.5 in [x0, x1): columns ceil(x0 - 0.5) .. ceil(x1 - 0.5) - 1.
        c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5) - 1
        r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5) - 1
        if c0 > c1 or r0 > r1:
            continue
        dc = col - min(max(col, c0), c1)
        dr = row - min(max(row, r0), r1)
        distance_squared = dc * dc + dr * dr
        if distance_squared == 0 or distance_squared < tolerance * tolerance:
            return True
    return False


def localization_error(correct_box: list[bool], label_rank: list[int | None], k: int) -> float:
    r"""The ILSVRC top-k localisation error of the Grad-CAM paper's table 1.

    An image counts as localised when the annotated class is among the model's k best classes
    (``label_rank`` is its 0-based rank, None when unknown) and the box of that class's map has
    IoU >= 0.5 with a ground-truth box (``correct_box``). Error = 1 - (localised images) / (images).
    """
    if len(correct_box) != len(label_rank):
        raise GradCAMError("correct_box and label_rank must have one entry per image")
    if not correct_box:
        return float("nan")
    good = sum(ok and rank is not None and rank < k for ok, rank in zip(correct_box, label_rank, strict=True))
    return 1.0 - good / len(correct_box)
