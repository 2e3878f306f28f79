"""Evaluation metrics against hand computations: the Grad-CAM box, IoU, localisation, the pointing game, RISE
deletion/insertion on a closed-form model, Average Drop / Increase in Confidence / Win %, the model-free
baseline maps and the scoring helpers (model left as found)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn
from torchvision.transforms.v2 import functional as TF

from gradcam.errors import GradCAMError
from gradcam.methods.maps import center_map, random_map, sobel_map
from gradcam.metrics.confidence import ConfidenceChange, confidence_change, win_percentage
from gradcam.metrics.localization import (
    boxes_from_map,
    iou,
    localization_error,
    localization_hit,
    pointing_hit,
)
from gradcam.metrics.perturbation import (
    Curve,
    baseline_image,
    deletion,
    insertion,
    pixel_counts,
    salience_ranks,
)
from gradcam.metrics.scoring import predict, score_stream, target_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


class SumLogit(nn.Module):
    """Two classes: logit_0 = 0, logit_1 = w * (sum of every input value), so softmax_1 = sigmoid(w * sum)."""

    def __init__(self, w: float = 0.5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.w * x.double().sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def blob_map(height: int, width: int, *blobs: tuple[int, int, int, int, float]) -> torch.Tensor:
    """Zero map with rectangles (row0, row1, col0, col1 inclusive, value)."""
    m = torch.zeros(height, width)
    for r0, r1, c0, c1, v in blobs:
        m[r0 : r1 + 1, c0 : c1 + 1] = v
    return m


# ---------------------------------------------------------------------------------------------------------
# boxes_from_map


def test_box_of_a_rectangle_is_its_half_open_extent() -> None:
    m = blob_map(16, 16, (3, 6, 2, 7, 1.0))  # rows 3..6, cols 2..7
    box = boxes_from_map(m)
    assert box.dtype == torch.float64
    assert box.tolist() == [2.0, 3.0, 8.0, 7.0]
    # numpy input too, and a non-uniform blob whose values all clear 15 % of the max
    m2 = m.numpy().copy()
    m2[4, 4] = 5.0
    assert boxes_from_map(m2).tolist() == [2.0, 3.0, 8.0, 7.0]


def test_box_of_two_blobs_is_the_larger_segment_not_the_brighter() -> None:
    # a small bright 2x2 blob (the maximum) and a larger 3x4 dimmer one (still above 15 %)
    m = blob_map(16, 16, (0, 1, 0, 1, 1.0), (8, 10, 9, 12, 0.5))
    assert boxes_from_map(m).tolist() == [9.0, 8.0, 13.0, 11.0]


def test_box_uses_eight_connectivity() -> None:
    m = torch.zeros(12, 12)
    for k in range(2, 7):  # a diagonal chain of 5 pixels: one segment only with 8-connectivity
        m[k, k] = 1.0
    m[10, 0:3] = 1.0  # a straight run of 3 pixels: would win if the diagonal were 5 segments of 1
    assert boxes_from_map(m).tolist() == [2.0, 2.0, 7.0, 7.0]


def test_box_tie_between_equal_segments_takes_the_first_in_raster_order() -> None:
    # both 2x2; B's first pixel (row 1) comes before A's (row 5) in raster order
    m = blob_map(12, 12, (5, 6, 0, 1, 1.0), (1, 2, 9, 10, 1.0))
    assert boxes_from_map(m).tolist() == [9.0, 1.0, 11.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_box_threshold_fourteen_percent_out_fifteen_in_unit_peak(dtype: torch.dtype) -> None:
    m = torch.zeros(10, 10, dtype=dtype)
    m[5, 5] = 1.0
    m[5, 6] = 0.14
    assert boxes_from_map(m).tolist() == [5.0, 5.0, 6.0, 6.0]
    m[5, 6] = 0.15
    assert boxes_from_map(m).tolist() == [5.0, 5.0, 7.0, 6.0]
    m[5, 6] = 0.149
    assert boxes_from_map(m).tolist() == [5.0, 5.0, 6.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("peak", [20.0, 100.0, 200.0])
def test_box_threshold_exact_fifteen_percent_of_any_peak_is_included(dtype: torch.dtype, peak: float) -> None:
    # M = [L >= 0.15 max L]: a pixel at exactly 15 % of the maximum (15 of 100, 3 of 20, 30 of 200; all
    # exactly representable) belongs to M whatever the map's dtype.
    m = torch.zeros(10, 10, dtype=dtype)
    m[5, 5] = peak
    m[5, 6] = peak * 15 / 100  # exact: 3, 15, 30
    m[5, 4] = peak * 14 / 100
    assert boxes_from_map(m).tolist() == [5.0, 5.0, 7.0, 6.0]


def test_box_of_a_map_without_positive_values_is_the_whole_image() -> None:
    assert boxes_from_map(torch.zeros(6, 9)).tolist() == [0.0, 0.0, 9.0, 6.0]
    assert boxes_from_map(-torch.rand(5, 7)).tolist() == [0.0, 0.0, 7.0, 5.0]


def test_box_of_a_stack_is_one_box_per_map() -> None:
    a = blob_map(8, 10, (1, 2, 3, 5, 1.0))
    b = blob_map(8, 10, (4, 7, 0, 0, 2.0))
    c = torch.zeros(8, 10)
    boxes = boxes_from_map(torch.stack([a, b, c]))
    assert boxes.tolist() == [[3.0, 1.0, 6.0, 3.0], [0.0, 4.0, 1.0, 8.0], [0.0, 0.0, 10.0, 8.0]]
    nested = boxes_from_map(torch.stack([a, b, c, a]).reshape(2, 2, 8, 10))
    assert nested.tolist() == [
        [[3.0, 1.0, 6.0, 3.0], [0.0, 4.0, 1.0, 8.0]],
        [[0.0, 0.0, 10.0, 8.0], [3.0, 1.0, 6.0, 3.0]],
    ]


def test_box_threshold_parameter_and_bad_inputs() -> None:
    m = torch.zeros(8, 8)
    m[2, 2] = 1.0
    m[2, 3] = 0.4
    assert boxes_from_map(m, threshold=0.5).tolist() == [2.0, 2.0, 3.0, 3.0]
    assert boxes_from_map(m, threshold=0.4).tolist() == [2.0, 2.0, 4.0, 3.0]
    with pytest.raises(GradCAMError, match="threshold"):
        boxes_from_map(m, threshold=1.5)
    bad = m.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(GradCAMError, match="NaN"):
        boxes_from_map(bad)


# ---------------------------------------------------------------------------------------------------------
# iou, localization_hit, localization_error


def test_iou_hand_values() -> None:
    box = [0, 0, 4, 4]  # area 16
    others = [
        [2, 2, 6, 6],  # inter 2x2 = 4, union 28
        [5, 5, 7, 7],  # disjoint
        [1, 1, 3, 3],  # contained: 4 / 16
        [4, 0, 8, 4],  # shares an edge only: half-open boxes do not overlap
        [0, 0, 4, 4],  # identical
        [0, 2, 4, 10],  # inter 4x2 = 8, union 16 + 32 - 8 = 40
    ]
    got = iou(box, others)
    expected = torch.tensor([4 / 28, 0.0, 4 / 16, 0.0, 1.0, 8 / 40], dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_iou_rejects_malformed_boxes() -> None:
    with pytest.raises(GradCAMError, match=r"\(M, 4\)"):
        iou([0, 0, 1, 1], [[0, 0, 1]])


def test_localization_hit_around_iou_one_half() -> None:
    m = blob_map(16, 16, (2, 5, 2, 5, 1.0))  # box (2, 2, 6, 6), area 16
    # (2, 2, 6, 10): contains the map's box, area 32: IoU = 16/32 = 0.5 exactly -> hit (>=)
    assert localization_hit(m, [[2, 2, 6, 10]])
    # (2, 2, 6, 11): area 36: 16/36 < 0.5 -> miss
    assert not localization_hit(m, [[2, 2, 6, 11]])
    # (3, 3, 7, 7): inter 9, union 23 -> 0.39 miss
    assert not localization_hit(m, [[3, 3, 7, 7]])
    # any box of the class may match
    assert localization_hit(m, [[3, 3, 7, 7], [2, 2, 6, 10]])
    # a single (4,) box is accepted
    assert localization_hit(m, [2, 2, 6, 6])
    # a stricter criterion
    assert not localization_hit(m, [[2, 2, 6, 10]], min_iou=0.6)
    # a lower threshold grows the map's box: 0.1 valued surround joins at threshold 0.05
    m2 = m.clone()
    m2[2:6, 6:10] = 0.1  # box (2, 2, 10, 6) at threshold 0.05, IoU with (2,2,6,6) = 16/32
    assert localization_hit(m2, [[2, 2, 6, 6]])
    assert not localization_hit(m2, [[2, 2, 6, 6]], threshold=0.05, min_iou=0.51)
    assert localization_hit(m2, [[2, 2, 10, 6]], threshold=0.05, min_iou=1.0)


def test_localization_hit_without_boxes_is_false() -> None:
    m = blob_map(8, 8, (2, 5, 2, 5, 1.0))
    assert not localization_hit(m, torch.zeros(0, 4))


def test_localization_error_top1_and_top5() -> None:
    correct = [True, True, False, True, True]
    ranks: list[int | None] = [0, 3, 0, None, 6]
    # top-1: only image 0 (box right and rank 0 < 1) -> 1 - 1/5
    assert localization_error(correct, ranks, 1) == pytest.approx(0.8)
    # top-5: images 0 and 1 (rank 3 < 5); image 2 has a wrong box, 3 an unknown rank, 4 rank 6
    assert localization_error(correct, ranks, 5) == pytest.approx(0.6)
    assert localization_error(correct, ranks, 7) == pytest.approx(0.4)
    assert localization_error([True], [4], 4) == pytest.approx(1.0)  # rank 4 is not among the 4 best
    assert math.isnan(localization_error([], [], 1))
    with pytest.raises(GradCAMError, match="one entry per image"):
        localization_error([True, False], [0], 1)


# ---------------------------------------------------------------------------------------------------------
# pointing game


def peak_map(height: int, width: int, row: int, col: int) -> torch.Tensor:
    m = torch.rand(height, width) * 0.5
    m[row, col] = 1.0
    return m


def test_pointing_peak_inside_the_box_hits() -> None:
    m = peak_map(20, 20, 10, 10)
    assert pointing_hit(m, [[8, 8, 13, 13]])
    assert pointing_hit(m, [[8, 8, 13, 13]], tolerance=0)
    assert pointing_hit(m, [10, 10, 11, 11], tolerance=0)  # the peak pixel alone


def test_pointing_tolerance_is_strict() -> None:
    m = peak_map(20, 20, 10, 10)
    right = [[12, 8, 16, 13]]  # columns 12..15: nearest pixel (10, 12), distance 2
    assert pointing_hit(m, right, tolerance=3)
    assert pointing_hit(m, right, tolerance=2.01)
    assert not pointing_hit(m, right, tolerance=2)  # distance == tolerance: miss (TorchRay: d < tol)
    assert not pointing_hit(m, right, tolerance=1.99)
    assert not pointing_hit(m, right, tolerance=0)
    diagonal = [[13, 14, 16, 17]]  # nearest pixel (14, 13): dr = 4, dc = 3, distance 5
    assert not pointing_hit(m, diagonal, tolerance=5)
    assert pointing_hit(m, diagonal, tolerance=5.001)
    assert not pointing_hit(m, diagonal, tolerance=4.99)


def test_pointing_default_tolerance_is_fifteen_pixels() -> None:
    m = peak_map(40, 40, 5, 5)
    assert not pointing_hit(m, [[20, 0, 25, 10]])  # nearest column 20: distance 15 -> miss
    assert pointing_hit(m, [[19, 0, 25, 10]])  # distance 14 -> hit
    assert not pointing_hit(m, [[16, 16, 30, 30]])  # (16-5, 16-5): distance 15.56 -> miss
    assert pointing_hit(m, [[15, 15, 30, 30]])  # distance 14.14 -> hit
    assert pointing_hit(m, [[20, 0, 25, 10], [19, 0, 25, 10]])  # any box


def test_pointing_without_a_positive_value_misses() -> None:
    assert not pointing_hit(torch.zeros(10, 10), [[0, 0, 10, 10]])
    assert not pointing_hit(-torch.rand(10, 10) - 0.1, [[0, 0, 10, 10]])
    assert not pointing_hit(peak_map(10, 10, 3, 3), torch.zeros(0, 4))


def test_pointing_tie_takes_the_first_maximum_in_raster_order() -> None:
    m = torch.zeros(20, 20)
    m[2, 2] = 1.0
    m[15, 15] = 1.0
    assert pointing_hit(m, [[2, 2, 3, 3]], tolerance=0)
    assert not pointing_hit(m, [[15, 15, 16, 16]], tolerance=0)


def test_pointing_box_pixels_are_those_whose_centres_lie_inside() -> None:
    m = peak_map(20, 20, 10, 10)
    # x0 = 12.6: column 12 (centre 12.5) is out, nearest column 13 -> distance 3 -> miss at tolerance 3
    assert not pointing_hit(m, [[12.6, 8, 16, 13]], tolerance=3)
    # x0 = 12.4: column 12 (centre 12.5) is in -> distance 2 -> hit at tolerance 3
    assert pointing_hit(m, [[12.4, 8, 16, 13]], tolerance=3)
    # right edge x1 = 9.4: column 9 (centre 9.5) is out, nearest column 8 -> distance 2
    assert not pointing_hit(m, [[5, 8, 9.4, 13]], tolerance=2)
    # x1 = 9.6: column 9 is in -> distance 1
    assert pointing_hit(m, [[5, 8, 9.6, 13]], tolerance=2)
    # tolerance 0: a box covering part of the peak pixel but not its centre (10.5, 10.5) misses...
    assert not pointing_hit(m, [[10.0, 10.0, 10.4, 10.4]], tolerance=0)
    assert not pointing_hit(m, [[10.6, 10.6, 11.0, 11.0]], tolerance=0)
    # ...a box holding that centre hits
    assert pointing_hit(m, [[10.4, 10.4, 10.6, 10.6]], tolerance=0)
    # rows follow the same rule: y0 = 12.6 -> nearest row 13, distance 3
    assert not pointing_hit(m, [[8, 12.6, 13, 16]], tolerance=3)
    assert pointing_hit(m, [[8, 12.4, 13, 16]], tolerance=3)


def test_pointing_box_centre_on_the_far_edge_is_outside_a_half_open_box() -> None:
    # Boxes are half-open [x0, x1) x [y0, y1) (module docstring): a pixel centre exactly on x1 or y1 is not
    # inside, one on x0 or y0 is. Edges at .5 are common after frame_boxes (e.g. 200 * 341/400 - 58 = 112.5).
    # A width-1 box [9.5, 10.5) then holds exactly one pixel centre (9.5), not two.
    m = peak_map(20, 20, 10, 10)
    assert pointing_hit(m, [[10.5, 10.5, 12, 12]], tolerance=0)  # centre (10.5, 10.5) on x0 and y0: inside
    assert not pointing_hit(m, [[9.0, 10.0, 10.5, 11.0]], tolerance=0)  # centre on x1: outside
    assert not pointing_hit(m, [[10.0, 9.0, 11.0, 10.5]], tolerance=0)  # centre on y1: outside


def test_pointing_rejects_negative_tolerance() -> None:
    with pytest.raises(GradCAMError, match="tolerance"):
        pointing_hit(peak_map(5, 5, 1, 1), [[0, 0, 1, 1]], tolerance=-1)


# ---------------------------------------------------------------------------------------------------------
# deletion / insertion

# A 3x4 image and a map ranking its pixels. Most-salient-first order, by hand:
# map 1.0 (1,2) 0.9 (0,1) 0.8 (2,1) 0.7 (1,0) 0.6 (2,2) 0.5 (0,3) 0.4 (2,0) 0.3 (1,1) 0.2 (0,0) 0.1 (0,2)
#     0.05 (2,3) 0.0 (1,3)
IMAGE = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]
MAP = [[0.2, 0.9, 0.1, 0.5], [0.7, 0.3, 1.0, 0.0], [0.4, 0.8, 0.6, 0.05]]
RANKS = [[8, 1, 9, 5], [3, 7, 0, 11], [6, 2, 4, 10]]
# image values in that order
ORDERED = [0.7, 0.2, 1.0, 0.5, 1.1, 0.4, 0.9, 0.6, 0.1, 0.3, 1.2, 0.8]
RASTER = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2]


def two_channel(image: list[list[float]]) -> torch.Tensor:
    """(1, 2, H, W) float64: channel 1 is twice channel 0, so every pixel's channels sum to 3x its value."""
    x = torch.tensor(image, dtype=torch.float64)
    return torch.stack([x, 2 * x])[None]


def test_salience_ranks_hand_table_and_stable_ties() -> None:
    ranks = salience_ranks(torch.tensor([MAP]))
    assert ranks.tolist() == [RANKS]
    assert salience_ranks(torch.full((1, 3, 4), 0.5)).tolist() == [
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    ]
    ties = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    assert salience_ranks(ties).tolist() == [[[0, 3, 1], [4, 2, 5]]]
    # larger maps with many ties (an unstable sort reorders these): Python's sorted() is stable
    assert salience_ranks(torch.zeros(1, 12, 16)).flatten().tolist() == list(range(192))
    torch.manual_seed(6)
    coarse = torch.randint(0, 4, (2, 12, 16)).float() / 4
    for b in range(2):
        values = coarse[b].flatten().tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        expected = [0] * len(values)
        for position, pixel in enumerate(order):
            expected[pixel] = position
        assert salience_ranks(coarse)[b].flatten().tolist() == expected


def test_pixel_counts_endpoints_and_rounding() -> None:
    assert pixel_counts(12, 3).tolist() == [0, 4, 8, 12]
    assert pixel_counts(12, 5).tolist() == [0, 2, 5, 7, 10, 12]  # 2.4, 4.8, 7.2, 9.6
    assert pixel_counts(7, 3).tolist() == [0, 2, 5, 7]  # 2.33, 4.67
    assert pixel_counts(1, 1).tolist() == [0, 1]
    for pixels, steps in [(10, 4), (3, 6), (224 * 224, 224), (49, 13), (100, 7)]:
        counts = pixel_counts(pixels, steps).tolist()
        assert counts[0] == 0 and counts[-1] == pixels and len(counts) == steps + 1
        assert counts == [round(i * pixels / steps) for i in range(steps + 1)]  # Python's round()


def test_deletion_curve_by_hand_with_default_steps_and_zero_baseline() -> None:
    model = SumLogit(0.5)
    x = two_channel(IMAGE)
    curve = deletion(model, x, torch.tensor([MAP]), [1])
    assert isinstance(curve, Curve) and curve.kind == "deletion"
    # RISE default: one step per row, S = H = 3 (not W = 4): n = 0, 4, 8, 12
    torch.testing.assert_close(curve.fractions, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))
    # what is left after zeroing the n most salient pixels (channel sum = 3x pixel value)
    left = [7.8, 7.8 - (0.7 + 0.2 + 1.0 + 0.5), 7.8 - (0.7 + 0.2 + 1.0 + 0.5 + 1.1 + 0.4 + 0.9 + 0.6), 0.0]
    expected = [sigmoid(0.5 * 3 * s) for s in left]
    torch.testing.assert_close(curve.probabilities, torch.tensor([expected], dtype=torch.float64))
    # trapezoid: sum (x_{i+1} - x_i) (p_i + p_{i+1}) / 2
    hand_auc = sum((expected[i] + expected[i + 1]) / 2 / 3 for i in range(3))
    assert float(curve.auc[0]) == pytest.approx(hand_auc, abs=1e-12)
    assert float(curve.auc[0]) == pytest.approx(
        float(np.trapezoid(expected, [0, 1 / 3, 2 / 3, 1])), abs=1e-12
    )


def test_deletion_with_five_steps_and_a_batch_regrouped_in_threes() -> None:
    model = SumLogit(0.5)
    inputs = torch.cat([two_channel(IMAGE), two_channel(IMAGE)])
    maps = torch.stack([torch.tensor(MAP), torch.full((3, 4), 0.3)])  # image 1: ties -> raster order
    seen: list[int] = []
    curve = deletion(model, inputs, maps, torch.tensor([1, 0]), steps=5, batch_size=4, on_batch=seen.append)
    counts = [0, 2, 5, 7, 10, 12]  # round(12 i / 5)
    assert curve.fractions.tolist() == pytest.approx([n / 12 for n in counts])
    total = sum(RASTER)
    left0 = [total - sum(ORDERED[:n]) for n in counts]
    left1 = [total - sum(RASTER[:n]) for n in counts]
    expected = [
        [sigmoid(1.5 * s) for s in left0],
        [1 - sigmoid(1.5 * s) for s in left1],  # class 0
    ]
    torch.testing.assert_close(curve.probabilities, torch.tensor(expected, dtype=torch.float64))
    assert sum(seen) == 2 * 6
    for row in range(2):
        assert float(curve.auc[row]) == pytest.approx(
            float(np.trapezoid(expected[row], [n / 12 for n in counts])), abs=1e-12
        )


def test_deletion_replaces_every_channel_of_a_pixel_with_the_baseline() -> None:
    model = SumLogit(1.0)
    x = two_channel(IMAGE)
    baseline = torch.tensor([-1.0, 0.5], dtype=torch.float64)[:, None, None]  # per-channel constant
    curve = deletion(model, x, torch.tensor([MAP]), [1], steps=3, baseline=baseline)
    # each removed pixel contributes -1 + 0.5 = -0.5 instead of 3 * value
    expected = []
    for n in [0, 4, 8, 12]:
        s = 3 * (sum(RASTER) - sum(ORDERED[:n])) - 0.5 * n
        expected.append(sigmoid(s))
    torch.testing.assert_close(curve.probabilities[0], torch.tensor(expected, dtype=torch.float64))


def test_insertion_curve_by_hand_with_a_constant_baseline() -> None:
    model = SumLogit(0.5)
    x = two_channel(IMAGE)
    curve = insertion(model, x, torch.tensor([MAP]), torch.tensor([1]), baseline=0.25)
    assert curve.kind == "insertion"
    # start from 0.25 everywhere (channel sum 0.5 per pixel), put back the n most salient pixels
    sums = [3 * sum(ORDERED[:n]) + 0.5 * (12 - n) for n in [0, 4, 8, 12]]
    assert sums == pytest.approx([6.0, 3 * 2.4 + 4.0, 3 * 5.4 + 2.0, 3 * 7.8])
    expected = [sigmoid(0.5 * s) for s in sums]
    torch.testing.assert_close(curve.probabilities, torch.tensor([expected], dtype=torch.float64))
    assert float(curve.auc[0]) == pytest.approx(
        float(np.trapezoid(expected, [0, 1 / 3, 2 / 3, 1])), abs=1e-12
    )
    # an int baseline is a number too
    as_int = insertion(model, x, torch.tensor([MAP]), [1], baseline=0)
    sums0 = [3 * sum(ORDERED[:n]) for n in [0, 4, 8, 12]]
    torch.testing.assert_close(
        as_int.probabilities[0], torch.tensor([sigmoid(0.5 * s) for s in sums0], dtype=torch.float64)
    )


def test_curves_of_an_all_equal_map_remove_pixels_in_raster_order() -> None:
    model = SumLogit(0.5)
    x = two_channel(IMAGE)
    flat = torch.full((1, 3, 4), 0.7)
    removed = deletion(model, x, flat, [1])
    expected = [sigmoid(1.5 * (sum(RASTER) - sum(RASTER[:n]))) for n in [0, 4, 8, 12]]
    torch.testing.assert_close(removed.probabilities[0], torch.tensor(expected, dtype=torch.float64))
    inserted = insertion(model, x, flat, [1], baseline=0.0)
    expected = [sigmoid(1.5 * sum(RASTER[:n])) for n in [0, 4, 8, 12]]
    torch.testing.assert_close(inserted.probabilities[0], torch.tensor(expected, dtype=torch.float64))


def reference_blur(image: np.ndarray) -> np.ndarray:
    """Gaussian blur, kernel 11, sigma 5, reflect padding (scipy 'mirror'), written out with numpy/scipy."""
    offsets = np.arange(-5, 6, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * 5.0**2))
    kernel /= kernel.sum()
    out = ndimage.correlate1d(image, kernel, axis=-1, mode="mirror")
    return ndimage.correlate1d(out, kernel, axis=-2, mode="mirror")


def test_blur_baseline_is_the_gaussian_of_kernel_11_sigma_5() -> None:
    x = torch.rand(2, 3, 12, 13, dtype=torch.float64)
    blurred = baseline_image(x, "blur")
    torch.testing.assert_close(blurred, TF.gaussian_blur(x, [11, 11], [5.0, 5.0]))
    torch.testing.assert_close(blurred, torch.from_numpy(reference_blur(x.numpy())), rtol=0, atol=1e-12)


def test_default_baselines_blur_for_insertion_zero_for_deletion() -> None:
    model = SumLogit(0.3)
    torch.manual_seed(3)
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    maps = torch.rand(1, 12, 12)
    inserted = insertion(model, x, maps, [1], steps=2)
    blurred_sum = float(reference_blur(x.numpy()).sum())
    assert float(inserted.probabilities[0, 0]) == pytest.approx(sigmoid(0.3 * blurred_sum), abs=1e-12)
    assert float(inserted.probabilities[0, -1]) == pytest.approx(sigmoid(0.3 * float(x.sum())), abs=1e-12)
    removed = deletion(model, x, maps, [1], steps=2)
    assert float(removed.probabilities[0, 0]) == pytest.approx(sigmoid(0.3 * float(x.sum())), abs=1e-12)
    assert float(removed.probabilities[0, -1]) == pytest.approx(0.5, abs=1e-12)  # all zero: sigmoid(0)


def test_baseline_image_numbers_and_tensors() -> None:
    x = torch.rand(2, 3, 4, 5)
    assert torch.equal(baseline_image(x, "zero"), torch.zeros(2, 3, 4, 5))
    assert torch.equal(baseline_image(x, 0.5), torch.full((2, 3, 4, 5), 0.5))
    per_channel = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    filled = baseline_image(x, per_channel)
    for c in range(3):
        assert torch.equal(filled[:, c], torch.full((2, 4, 5), float(c + 1)))


def test_perturbation_input_checks() -> None:
    model = SumLogit()
    x = torch.rand(2, 1, 4, 5, dtype=torch.float64)
    maps = torch.rand(2, 4, 5)
    with pytest.raises(GradCAMError, match=r"maps must be \(B,H,W\).*upsample"):
        deletion(model, x, torch.rand(2, 4, 4), [1, 1])
    with pytest.raises(GradCAMError, match=r"maps must be"):
        deletion(model, x, torch.rand(1, 4, 5), [1, 1])
    with pytest.raises(GradCAMError, match=r"one class per image \(2\), got 3"):
        insertion(model, x, maps, [1, 1, 0])
    with pytest.raises(GradCAMError, match=r"one class per image \(2\), got 1"):
        deletion(model, x, maps, [1])
    with pytest.raises(GradCAMError, match=r"inputs must be \(B,C,H,W\)"):
        deletion(model, x[0], maps, [1, 1])
    with pytest.raises(GradCAMError, match=r"'zero', 'blur'.*'gaussian'"):
        deletion(model, x, maps, [1, 1], baseline="gaussian")
    with pytest.raises(GradCAMError, match="'zero', 'blur'"):
        baseline_image(x, [0.0])  # type: ignore[arg-type]
    with pytest.raises(GradCAMError, match="does not broadcast"):
        deletion(model, x, maps, [1, 1], baseline=torch.zeros(3, 1, 1))
    for steps in [0, -2, 2.5, True]:
        with pytest.raises(GradCAMError, match="steps must be a positive integer"):
            deletion(model, x, maps, [1, 1], steps=steps)  # type: ignore[arg-type]
    assert issubclass(GradCAMError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Average Drop, Increase in Confidence, Win %


def confidence_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor(
        [
            [[[0.1, 0.2], [0.3, 0.4]]],  # sum 1.0
            [[[-0.2, -0.2], [-0.2, -0.2]]],  # sum -0.8
            [[[0.4, 0.4], [0.4, 0.4]]],  # sum 1.6
        ],
        dtype=torch.float64,
    )
    maps = torch.tensor(
        [
            [[1.0, 0.5], [0.0, 0.25]],  # explained values 0.1, 0.1, 0, 0.1: sum 0.3
            [[0.5, 0.5], [0.5, 0.5]],  # sum -0.4
            [[1.0, 1.0], [1.0, 1.0]],  # the image itself: sum 1.6
        ]
    )
    return x, maps, torch.tensor([1, 1, 0])


def test_confidence_change_by_hand_with_black_zero() -> None:
    model = SumLogit(0.5)
    x, maps, targets = confidence_batch()
    change = confidence_change(model, x, maps, targets)
    y = [sigmoid(0.5), sigmoid(-0.4), 1 - sigmoid(0.8)]
    o = [sigmoid(0.15), sigmoid(-0.2), 1 - sigmoid(0.8)]
    torch.testing.assert_close(change.original, torch.tensor(y, dtype=torch.float64))
    torch.testing.assert_close(change.explained, torch.tensor(o, dtype=torch.float64))
    drops = [(y[0] - o[0]) / y[0], 0.0, 0.0]  # image 1 gains confidence, image 2 is unchanged
    torch.testing.assert_close(change.drop, torch.tensor(drops, dtype=torch.float64))
    assert change.average_drop == pytest.approx(100 * sum(drops) / 3)
    assert change.increase_in_confidence == pytest.approx(100 / 3)  # only image 1 (image 2 ties)


def test_confidence_change_with_a_black_level() -> None:
    model = SumLogit(0.5)
    x, maps, targets = confidence_batch()
    change = confidence_change(model, x[:1], maps[:1], targets[:1], black=0.5)
    # 0.5 + m (x - 0.5): 0.5 + 1(-0.4) = 0.1, 0.5 + 0.5(-0.3) = 0.35, 0.5 + 0 = 0.5, 0.5 + 0.25(-0.1) = 0.475
    explained_sum = 0.1 + 0.35 + 0.5 + 0.475
    assert float(change.explained[0]) == pytest.approx(sigmoid(0.5 * explained_sum), abs=1e-12)
    assert float(change.original[0]) == pytest.approx(sigmoid(0.5), abs=1e-12)
    assert change.average_drop == pytest.approx(0.0)  # 1.425 > 1.0: confidence rises
    assert change.increase_in_confidence == pytest.approx(100.0)


class ChannelLogit(nn.Module):
    """logit_0 = 0, logit_1 = sum_c v_c (sum of channel c): channels weigh differently."""

    def __init__(self, weights: tuple[float, ...]) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.tensor(weights, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x.double().sum(dim=(2, 3)) * self.v).sum(dim=1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_confidence_change_with_a_per_channel_black() -> None:
    model = ChannelLogit((1.0, 2.0))
    x = torch.tensor([[[[0.2, 0.6]], [[1.0, -0.5]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    maps = torch.tensor([[[0.5, 0.0]]])
    change = confidence_change(model, x, maps, [1], black=torch.tensor([0.5, -1.0]))
    original = 1 * (0.2 + 0.6) + 2 * (1.0 - 0.5)  # 1.8
    # channel 0: 0.5 + 0.5 (0.2 - 0.5) = 0.35, 0.5 + 0 = 0.5; channel 1: -1 + 0.5 (1 + 1) = 0, -1 + 0 = -1
    explained = 1 * (0.35 + 0.5) + 2 * (0.0 - 1.0)  # -1.15
    assert float(change.original[0]) == pytest.approx(sigmoid(original), abs=1e-12)
    assert float(change.explained[0]) == pytest.approx(sigmoid(explained), abs=1e-12)
    y, o = sigmoid(original), sigmoid(explained)
    assert change.average_drop == pytest.approx(100 * (y - o) / y)


def test_confidence_change_refuses_maps_outside_unit_interval() -> None:
    model = SumLogit()
    x, maps, targets = confidence_batch()
    with pytest.raises(GradCAMError, match=r"\[0, 1\]"):
        confidence_change(model, x, maps * 1.5, targets)
    with pytest.raises(GradCAMError, match=r"\[0, 1\]"):
        confidence_change(model, x, maps - 0.1, targets)
    with pytest.raises(GradCAMError, match="one class per image"):
        confidence_change(model, x, maps, [1, 1])


def test_win_percentage_ties_count_for_neither() -> None:
    original = torch.tensor([0.8, 0.5, 0.9, 0.4], dtype=torch.float64)
    a = ConfidenceChange(original, torch.tensor([0.4, 0.5, 0.95, 0.2], dtype=torch.float64))
    b = ConfidenceChange(original, torch.tensor([0.6, 0.25, 0.9, 0.2], dtype=torch.float64))
    # drops a: 0.5, 0, 0, 0.5; b: 0.25, 0.5, 0, 0.5 -> a wins image 1, b wins image 0, 2 and 3 tie
    torch.testing.assert_close(a.drop, torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=torch.float64))
    assert win_percentage(a, b) == pytest.approx(25.0)
    assert win_percentage(b, a) == pytest.approx(25.0)
    assert win_percentage(a, a) == pytest.approx(0.0)
    assert a.increase_in_confidence == pytest.approx(25.0)  # image 2: 0.95 > 0.9
    assert a.average_drop == pytest.approx(25.0)
    other = ConfidenceChange(original + 0.01, b.explained)
    with pytest.raises(GradCAMError, match="same images"):
        win_percentage(a, other)


def test_win_percentage_on_the_closed_form_model() -> None:
    model = SumLogit(0.5)
    x, maps, targets = confidence_batch()
    a = confidence_change(model, x, maps, targets)
    half = confidence_change(model, x, torch.full_like(maps, 0.5), targets)
    # half map: image 0 keeps sum 0.5 -> O = s(0.25), a smaller drop than a's O = s(0.15): half wins;
    # image 1: the same map as a's -> tie; image 2 (class 0): sum 0.8 -> p0 rises -> drop 0, as a's: tie
    y0 = sigmoid(0.5)
    drop_a0, drop_half0 = (y0 - sigmoid(0.15)) / y0, (y0 - sigmoid(0.25)) / y0
    assert drop_half0 < drop_a0
    torch.testing.assert_close(half.drop, torch.tensor([drop_half0, 0.0, 0.0], dtype=torch.float64))
    assert win_percentage(half, a) == pytest.approx(100 / 3)
    assert win_percentage(a, half) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------
# baseline maps


@pytest.mark.parametrize("size", [(9, 7), (8, 6), (5, 12)])
def test_center_map_is_the_gaussian_at_pixel_centres(size: tuple[int, int]) -> None:
    h, w = size
    got = center_map(3, size)
    y = np.arange(h) + 0.5
    x = np.arange(w) + 0.5
    s = 0.25
    expected = np.exp(
        -((y[:, None] - h / 2) ** 2 / (2 * (s * h) ** 2) + (x[None, :] - w / 2) ** 2 / (2 * (s * w) ** 2))
    )
    for b in range(3):
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[0].numpy(), got[0].flip(0).flip(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[0].numpy(), got[0].flip(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[0].numpy(), got[0].flip(1).numpy(), rtol=1e-6)
    # the maximum sits at the central pixel(s)
    rows = {h // 2} if h % 2 else {h // 2 - 1, h // 2}
    cols = {w // 2} if w % 2 else {w // 2 - 1, w // 2}
    peak = got[0].max()
    where = {(int(r), int(c)) for r, c in torch.nonzero(got[0] == peak)}
    assert where == {(r, c) for r in rows for c in cols}


def test_center_map_peak_is_one_and_sigma_is_honoured() -> None:
    got = center_map(1, (5, 5), sigma=0.5)
    assert float(got[0, 2, 2]) == pytest.approx(1.0)
    # pixel (2, 0): centre x = 0.5, cx = 2.5: exp(-(2)^2 / (2 * 2.5^2))
    assert float(got[0, 2, 0]) == pytest.approx(math.exp(-4 / 12.5), rel=1e-6)


def step_picture(height: int = 6, width: int = 8) -> torch.Tensor:
    """(3, H, W): columns 0..3 black, 4..7 white: a vertical step edge between columns 3 and 4."""
    p = torch.zeros(3, height, width, dtype=torch.float64)
    p[:, :, width // 2 :] = 1.0
    return p


def scipy_sobel(picture: torch.Tensor) -> np.ndarray:
    r, g, b = picture.double().numpy()
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    return np.hypot(ndimage.sobel(luma, axis=1), ndimage.sobel(luma, axis=0))


def test_sobel_of_a_vertical_step_edge() -> None:
    edges = sobel_map(step_picture()[None])[0]
    # columns 3 and 4: (x[c+1] - x[c-1]) = 1, smoothed by [1, 2, 1] down the column: 4; elsewhere flat: 0
    expected = torch.zeros(6, 8)
    expected[:, 3:5] = 4.0
    torch.testing.assert_close(edges, expected)


def test_sobel_uses_bt601_luma() -> None:
    p = torch.zeros(3, 6, 8, dtype=torch.float64)
    p[0, :, 4:] = 1.0  # red step only
    p[1] = 0.3  # flat green and blue add no gradient
    p[2] = 0.9
    expected = torch.zeros(6, 8)
    expected[:, 3:5] = 4 * 0.299
    torch.testing.assert_close(sobel_map(p[None])[0], expected)


def test_sobel_images_of_a_batch_do_not_influence_each_other() -> None:
    torch.manual_seed(1)
    step = step_picture(10, 12)
    noise = torch.rand(3, 10, 12, dtype=torch.float64)
    alone = sobel_map(step[None])[0]
    batch = sobel_map(torch.stack([step, noise, torch.ones(3, 10, 12, dtype=torch.float64)]))
    torch.testing.assert_close(batch[0], alone)
    np.testing.assert_allclose(batch[0].numpy(), scipy_sobel(step), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch[1].numpy(), scipy_sobel(noise), rtol=1e-6, atol=1e-6)
    assert float(batch[2].abs().max()) == 0.0  # a flat image has no edge, whatever its neighbours


def test_random_map_is_reproducible_on_a_grid_of_one_32nd() -> None:
    a = random_map(2, (33, 64), torch.Generator().manual_seed(7))
    b = random_map(2, (33, 64), torch.Generator().manual_seed(7))
    c = random_map(2, (33, 64), torch.Generator().manual_seed(8))
    assert a.shape == (2, 2, 2)  # ceil(33/32) = 2, ceil(64/32) = 2
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image its own draw
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert random_map(1, (32, 31), torch.Generator().manual_seed(0)).shape == (1, 1, 1)
    assert random_map(1, (224, 225), torch.Generator().manual_seed(0)).shape == (1, 7, 8)


# ---------------------------------------------------------------------------------------------------------
# scoring


class Flat(nn.Module):
    """logits = W dropout(x.flatten()) + b: dropout changes the answer unless the model is in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(12, 3, dtype=torch.float64)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return self.lin(self.drop(x.flatten(1)))


def numpy_softmax(model: Flat, x: torch.Tensor) -> np.ndarray:
    w = model.lin.weight.detach().numpy()
    b = model.lin.bias.detach().numpy()
    logits = x.reshape(len(x), -1).numpy() @ w.T + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_target_probabilities_is_the_softmax_and_leaves_the_model_as_found() -> None:
    torch.manual_seed(2)
    model = Flat()
    model.train()
    model.lin.eval()  # a mixed state, to be restored module by module
    model.lin.bias.requires_grad_(False)
    grad = torch.randn(3, 12, dtype=torch.float64)
    model.lin.weight.grad = grad.clone()
    hook_calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: hook_calls.append(len(args[0])))
    hooks_before = (len(model._forward_hooks), len(model._forward_pre_hooks), len(model.lin._forward_hooks))

    x = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    targets = torch.tensor([0, 2, 1, 1, 0])
    got = target_probabilities(model, x, targets, batch_size=2)

    probs = numpy_softmax(model, x)
    expected = probs[np.arange(5), targets.numpy()]
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert model.calls == [2, 2, 1] and hook_calls == [2, 2, 1]
    assert model.training and model.drop.training and not model.lin.training
    assert model.lin.weight.requires_grad and not model.lin.bias.requires_grad
    assert torch.equal(model.lin.weight.grad, grad) and model.lin.bias.grad is None
    assert (
        len(model._forward_hooks),
        len(model._forward_pre_hooks),
        len(model.lin._forward_hooks),
    ) == hooks_before
    assert torch.is_grad_enabled()
    one_batch = target_probabilities(model, x, targets, batch_size=100)
    torch.testing.assert_close(one_batch, got, rtol=0, atol=1e-15)
    assert target_probabilities(model, x[:0], targets[:0]).shape == (0,)


def test_predict_returns_eval_mode_logits() -> None:
    torch.manual_seed(4)
    model = Flat().train()
    x = torch.randn(3, 1, 3, 4, dtype=torch.float64)
    logits = predict(model, x, batch_size=2)
    w, b = model.lin.weight.detach().numpy(), model.lin.bias.detach().numpy()
    np.testing.assert_allclose(logits.numpy(), x.reshape(3, -1).numpy() @ w.T + b, rtol=1e-5, atol=1e-6)
    assert model.training and model.drop.training


def test_score_stream_regroups_pieces() -> None:
    torch.manual_seed(5)
    model = Flat().eval()
    x = torch.randn(6, 1, 3, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    pieces = [(x[0:2], t[0:2]), (x[2:5], t[2:5]), (x[5:6], t[5:6])]
    seen: list[int] = []
    got = score_stream(model, iter(pieces), batch_size=4, on_batch=seen.append)
    expected = numpy_softmax(model, x)[np.arange(6), t.numpy()]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert sum(seen) == 6
    assert max(model.calls) <= 4
    assert score_stream(model, iter([]), batch_size=4).shape == (0,)


def test_curves_leave_a_training_model_as_found() -> None:
    model = SumLogit(0.5).train()
    model.w.grad = torch.tensor(3.0, dtype=torch.float64)
    x = two_channel(IMAGE)
    deletion(model, x, torch.tensor([MAP]), [1])
    insertion(model, x, torch.tensor([MAP]), [1], baseline=0.0)
    confidence_change(model, x, torch.tensor([MAP]), [1])
    assert model.training and model.w.requires_grad and float(model.w.grad) == 3.0


def test_a_map_without_positive_values_localises_nothing() -> None:
    # its "box" is the whole image (every pixel passes 15% of 0), but it singles out no region:
    # a miss, as in the pointing game, even against a box covering most of the image
    zeros = torch.zeros(20, 20)
    assert not localization_hit(zeros, [[0, 0, 20, 15]])
    assert not pointing_hit(zeros, [[0, 0, 20, 15]])
    assert localization_hit(torch.ones(20, 20), [[0, 0, 20, 15]])  # IoU 0.75 with the whole image


def test_average_drop_is_zero_not_nan_when_the_original_probability_is_zero() -> None:
    change = ConfidenceChange(
        torch.tensor([0.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.25]).double()
    )
    assert change.drop.tolist() == [0.0, 0.5]
    assert change.average_drop == 25.0
