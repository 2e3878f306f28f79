"""gradcam.viz drawing for other tasks: detection boxes with captions, mask outlines, frame strips.

Expected pixels are worked out here from the boxes, masks and offsets; pictures are random noise, so
that "unchanged" means every channel of every such pixel equals the input's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from gradcam.errors import GradCAMError
from gradcam.viz import draw_boxes, draw_mask_outline, frame_strip

YELLOW, CYAN = (255, 255, 0), (0, 255, 255)


def noise(width: int = 64, height: int = 48, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A picture of random pixels kept away from pure yellow, cyan, black and white (channels 30..220)."""
    array = np.random.default_rng(seed).integers(30, 221, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array), array


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture)


def is_colour(region: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(region == np.array(colour, dtype=np.uint8), axis=-1)


# ------------------------------------------------------------ draw_boxes


def test_box_outline_has_the_colour_and_the_inside_and_outside_are_unchanged():
    picture, before = noise()
    x0, y0, x1, y1 = 10, 20, 40, 40
    after = pixels(draw_boxes(picture, [(x0, y0, x1, y1)], [""], width=2))
    # The outline: two pixels thick, inside the box, on all four sides (corners included).
    ring = np.zeros(before.shape[:2], dtype=bool)
    ring[y0 : y1 + 1, x0 : x1 + 1] = True
    ring[y0 + 2 : y1 - 1, x0 + 2 : x1 - 1] = False
    assert is_colour(after[ring], YELLOW).all()
    # Everything else is untouched: the box's inside and the rest of the picture.
    np.testing.assert_array_equal(after[~ring], before[~ring])
    np.testing.assert_array_equal(pixels(picture), before)  # the caller's picture is not drawn on


GREY = (100, 100, 100)


def near_black(region: np.ndarray) -> np.ndarray:
    """Text pixels of black, anti-aliased, ink: every channel under 64."""
    return region.max(axis=-1) < 64


def changed_from(region: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return ~is_colour(region, colour)


def test_box_caption_sits_on_a_filled_label_just_above_the_box():
    picture = Image.new("RGB", (96, 64), GREY)
    x0, y0, x1, y1 = 20, 30, 70, 60
    after = pixels(draw_boxes(picture, [(x0, y0, x1, y1)], ["person 0.91"], width=2))
    label = changed_from(after[:y0], GREY)
    rows, columns = np.nonzero(label)
    # The label: a solid block whose bottom row is right above the box's top and left side on the box's.
    assert rows.max() == y0 - 1 and columns.min() == x0
    block = after[rows.min() : y0, x0 : columns.max() + 1]
    assert label[rows.min() : y0, x0 : columns.max() + 1].all()
    assert 8 <= block.shape[0] < y0 and block.shape[1] > 30  # about one line of "person 0.91"
    # Yellow fill with black text (black reads better on yellow): yellow or a blend of the two.
    assert is_colour(block, YELLOW).mean() > 0.5
    assert near_black(block).sum() > 10
    assert (block[..., 0] == block[..., 1]).all() and (block[..., 2] == 0).all()
    # Nothing else changed: inside the box (below its outline), left of it, below it.
    outline_and_label = np.zeros(after.shape[:2], dtype=bool)
    outline_and_label[rows.min() : y0, x0 : columns.max() + 1] = True
    outline_and_label[y0 : y1 + 1, x0 : x1 + 1] = True
    outline_and_label[y0 + 2 : y1 - 1, x0 + 2 : x1 - 1] = False
    assert is_colour(after[~outline_and_label], GREY).all()


def test_box_caption_goes_inside_a_box_at_the_top_edge():
    picture = Image.new("RGB", (96, 64), GREY)
    after = pixels(draw_boxes(picture, [(10, 0, 80, 50)], ["dog 0.5"], width=2))
    inside = after[2:20, 12:60]  # just under the top outline, inside the box
    assert is_colour(inside, YELLOW).sum() > 100
    assert near_black(inside).sum() > 10
    assert is_colour(after[51:], GREY).all() and is_colour(after[:, 81:], GREY).all()


def test_box_caption_keeps_inside_the_picture_on_the_right():
    picture = Image.new("RGB", (96, 64), GREY)
    after = pixels(draw_boxes(picture, [(88, 30, 95, 60)], ["person 0.91"], width=1))
    columns = np.nonzero(changed_from(after[:30], GREY))[1]
    assert columns.max() == 95 and columns.min() < 60  # shifted left so that all of it shows


def test_box_label_is_white_on_a_dark_colour():
    picture = Image.new("RGB", (96, 64), GREY)
    navy = (0, 0, 128)
    after = pixels(draw_boxes(picture, [(20, 30, 70, 60)], ["cat"], color=navy, width=2))
    label = after[:30, 20:]
    assert is_colour(label, navy).sum() > 50
    assert (label.min(axis=-1) > 190).sum() > 10  # white text
    drawn = label[changed_from(label, GREY)].astype(int)
    assert (drawn[:, 0] == drawn[:, 1]).all() and (drawn[:, 2] >= 128).all()  # navy, white or between


def test_empty_caption_draws_no_label():
    picture = Image.new("RGB", (96, 64), GREY)
    after = pixels(draw_boxes(picture, [(20, 30, 70, 60)], [""], width=2))
    assert is_colour(after[:30], GREY).all()


def test_box_line_width_default_scales_with_the_picture():
    for size, line in (((64, 48), 2), ((900, 700), 4)):
        picture = Image.new("RGB", size, (50, 60, 70))
        after = pixels(draw_boxes(picture, [(5, 5, 60, 40)], [""]))
        row = after[20, :30]
        coloured = np.nonzero(is_colour(row, YELLOW))[0]
        np.testing.assert_array_equal(coloured, np.arange(5, 5 + line))


def test_box_partly_outside_is_clipped_and_one_wholly_outside_is_left_out():
    picture, before = noise()
    after = pixels(draw_boxes(picture, [(-10, 10, 20, 30), (100, 100, 120, 130)], ["", ""], width=1))
    assert is_colour(after[10:31, 0], YELLOW).all()  # the clipped left side lies on the picture's edge
    assert is_colour(after[10:31, 20], YELLOW).all()
    np.testing.assert_array_equal(after[:, 21:], before[:, 21:])


def test_box_float_corners_and_a_grey_picture():
    picture = Image.new("L", (40, 30), 100)
    after = pixels(draw_boxes(picture, [(4.6, 5.2, 30.4, 20.0)], [""], width=1))
    assert after.shape == (30, 40, 3)
    assert is_colour(after[5:21, 5], YELLOW).all() and is_colour(after[5:21, 30], YELLOW).all()
    assert (after[10, 10] == 100).all()


def test_box_caption_count_must_match():
    picture, _ = noise()
    with pytest.raises(GradCAMError, match="2 for 1 boxes"):
        draw_boxes(picture, [(0, 0, 10, 10)], ["a", "b"])
    with pytest.raises(GradCAMError, match="box 0 must be"):
        draw_boxes(picture, [(0, 0, 10)], ["a"])
    with pytest.raises(GradCAMError, match="x0 <= x1"):
        draw_boxes(picture, [(10, 0, 5, 10)], ["a"])
    with pytest.raises(GradCAMError, match="width"):
        draw_boxes(picture, [(0, 0, 10, 10)], ["a"], width=0)


# ------------------------------------------------------------ draw_mask_outline


def rectangle_mask(top: int = 10, bottom: int = 30, left: int = 20, right: int = 40) -> np.ndarray:
    mask = np.zeros((48, 64), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_mask_outline_colours_the_boundary_and_leaves_the_rest():
    picture, before = noise()
    mask = rectangle_mask()
    after = pixels(draw_mask_outline(picture, mask, width=2))
    cross = ndimage.generate_binary_structure(2, 1)
    inner = mask & ~ndimage.binary_erosion(mask, cross)
    outer = ~mask & ndimage.binary_dilation(mask, cross)
    boundary = inner | outer
    assert is_colour(after[boundary], CYAN).all()
    np.testing.assert_array_equal(after[~boundary], before[~boundary])
    np.testing.assert_array_equal(pixels(picture), before)


@pytest.mark.parametrize(
    ("width", "left_columns"),
    [(1, [20]), (2, [19, 20]), (3, [19, 20, 21]), (4, [18, 19, 20, 21]), (5, [18, 19, 20, 21, 22])],
)
def test_mask_outline_is_width_pixels_thick(width, left_columns):
    picture, before = noise()
    after = pixels(draw_mask_outline(picture, rectangle_mask(), width=width))
    row = is_colour(after[20], CYAN)
    # Across the rectangle's left side (column 20 is its first) and, mirrored, its right side (39).
    right_columns = [59 - column for column in left_columns]
    np.testing.assert_array_equal(np.nonzero(row)[0], sorted(left_columns + right_columns))
    # Far from the boundary: unchanged, inside and out.
    distance = ndimage.distance_transform_cdt(~find_edge(rectangle_mask()), metric="chessboard")
    far = distance > width
    np.testing.assert_array_equal(after[far], before[far])


def find_edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def test_mask_outline_takes_a_torch_tensor_and_closes_at_the_picture_edge():
    picture, before = noise()
    mask = rectangle_mask(top=0, bottom=10, left=0, right=64)
    from_numpy = pixels(draw_mask_outline(picture, mask))
    from_torch = pixels(draw_mask_outline(picture, torch.from_numpy(mask)))
    np.testing.assert_array_equal(from_torch, from_numpy)
    assert is_colour(from_numpy[0], CYAN).all()  # the picture's top edge closes the mask
    assert is_colour(from_numpy[9:11], CYAN).all()
    np.testing.assert_array_equal(from_numpy[2:8, 2:-2], before[2:8, 2:-2])


def test_empty_mask_gives_an_unchanged_copy():
    picture, before = noise()
    result = draw_mask_outline(picture, np.zeros((48, 64), dtype=bool))
    assert result is not picture
    np.testing.assert_array_equal(pixels(result), before)


def test_mask_must_match_the_picture_and_be_boolean():
    picture, _ = noise()
    with pytest.raises(GradCAMError, match=r"\(10, 12\).*\(48, 64\)"):
        draw_mask_outline(picture, np.zeros((10, 12), dtype=bool))
    with pytest.raises(GradCAMError, match="boolean"):
        draw_mask_outline(picture, np.zeros((48, 64), dtype=np.float32))
    with pytest.raises(GradCAMError, match="width"):
        draw_mask_outline(picture, rectangle_mask(), width=0)


# ------------------------------------------------------------ frame_strip


def coloured_frames(count: int, size: tuple[int, int] = (8, 6)) -> list[Image.Image]:
    return [Image.new("RGB", size, (20 * k, 200 - 20 * k, 7 * k)) for k in range(count)]


def test_frame_strip_puts_frame_k_at_its_offset_in_rows_of_columns():
    frames = coloured_frames(5)
    strip = pixels(frame_strip(frames, columns=2, gap=3))
    assert strip.shape == (3 * 6 + 2 * 3, 2 * 8 + 3, 3)
    covered = np.zeros(strip.shape[:2], dtype=bool)
    for k, frame in enumerate(frames):
        top, left = (k // 2) * (6 + 3), (k % 2) * (8 + 3)
        np.testing.assert_array_equal(strip[top : top + 6, left : left + 8], pixels(frame))
        covered[top : top + 6, left : left + 8] = True
    assert (strip[~covered] == 255).all()  # gaps and the empty last slot are white


def test_frame_strip_defaults_to_one_row():
    frames = coloured_frames(3)
    strip = pixels(frame_strip(frames))
    assert strip.shape == (6, 3 * 8 + 2 * 4, 3)
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(strip[:, k * 12 : k * 12 + 8], pixels(frame))
    assert (strip[:, 8:12] == 255).all()


def test_frame_strip_refuses_frames_of_different_sizes_and_bad_layouts():
    with pytest.raises(GradCAMError, match=r"frame 1 is \(9, 6\)"):
        frame_strip([*coloured_frames(1), *coloured_frames(1, (9, 6))])
    with pytest.raises(GradCAMError, match="at least one frame"):
        frame_strip([])
    with pytest.raises(GradCAMError, match="columns"):
        frame_strip(coloured_frames(2), columns=0)
