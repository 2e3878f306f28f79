"""gradcam.io.load_image: every format as 8-bit RGB, transparency on white, EXIF, limits and clear errors.

All images are made here, in tmp_path, with numpy and Pillow; expected pixels are the ones the tests drew.
"""

from __future__ import annotations

import inspect
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.io import MAX_PIXELS, load_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
WHITE = (255, 255, 255)


def quadrants(width: int = 32, height: int = 24) -> np.ndarray:
    """Top-left red, top-right green, bottom-left blue, bottom-right yellow; width != height on purpose."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2 :] = GREEN
    array[height // 2 :, : width // 2] = BLUE
    array[height // 2 :, width // 2 :] = YELLOW
    return array


def quadrant_centres(width: int, height: int) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(x, y) at the middle of each quadrant -> the colour drawn there by ``quadrants``."""
    left, right, top, bottom = width // 4, 3 * width // 4, height // 4, 3 * height // 4
    return {(left, top): RED, (right, top): GREEN, (left, bottom): BLUE, (right, bottom): YELLOW}


def assert_rgb_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size
    array = np.asarray(image)
    assert array.dtype == np.uint8
    return array.astype(int)


def over_white(colour: tuple[int, int, int], alpha: int) -> np.ndarray:
    """Straight-alpha 'over' onto an opaque white background, computed by hand."""
    a = alpha / 255.0
    return np.array(colour) * a + 255.0 * (1.0 - a)


# ------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("suffix", "save_kwargs", "tolerance"),
    [
        (".png", {}, 0),
        (".bmp", {}, 0),
        (".tif", {}, 0),
        (".tiff", {"compression": "tiff_lzw"}, 0),
        (".webp", {"lossless": True}, 0),
        (".webp", {"quality": 90}, 40),
        (".jpg", {"quality": 95, "subsampling": 0}, 12),
        (".jpeg", {"quality": 95}, 40),
    ],
)
def test_formats_load_as_rgb_with_their_colours(tmp_path, suffix, save_kwargs, tolerance):
    drawn = quadrants()
    path = tmp_path / f"picture{suffix}"
    Image.fromarray(drawn).save(path, **save_kwargs)

    loaded = assert_rgb_image(load_image(path), (32, 24))

    for (x, y), colour in quadrant_centres(32, 24).items():
        assert np.abs(loaded[y, x] - np.array(colour)).max() <= tolerance, (x, y, loaded[y, x], colour)
    if tolerance == 0:
        np.testing.assert_array_equal(loaded, drawn)


def test_string_path_is_accepted(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(quadrants()).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), quadrants())


def test_palette_gif_is_expanded_through_its_palette(tmp_path):
    palette_colours = [(10, 20, 30), (200, 100, 50), (0, 255, 128), (255, 255, 255)]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 0]], dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette([channel for colour in palette_colours for channel in colour])
    path = tmp_path / "palette.gif"
    picture.save(path)
    assert Image.open(path).mode == "P"

    loaded = assert_rgb_image(load_image(path), (4, 3))

    expected = np.array(palette_colours)[indices]
    np.testing.assert_array_equal(loaded, expected)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    gray = np.array([[0, 1, 64], [128, 200, 255]], dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)

    loaded = assert_rgb_image(load_image(path), (3, 2))

    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path):
    bits = np.array([[True, False], [False, True]])
    path = tmp_path / "bits.png"
    Image.fromarray(bits).convert("1").save(path)
    assert Image.open(path).mode == "1"

    loaded = assert_rgb_image(load_image(path), (2, 2))

    np.testing.assert_array_equal(loaded, np.where(bits[..., None], 255, 0) * np.ones(3, dtype=int))


# ------------------------------------------------------------ transparency


def test_rgba_is_composited_onto_white(tmp_path):
    pixels = np.array([[(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128), (0, 128, 0, 64)]], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, mode="RGBA").save(path)

    loaded = assert_rgb_image(load_image(path), (4, 1))

    assert tuple(loaded[0, 0]) == WHITE  # fully transparent -> background
    assert tuple(loaded[0, 1]) == RED  # opaque red stays red
    assert np.abs(loaded[0, 2] - over_white((0, 0, 255), 128)).max() <= 1
    assert np.abs(loaded[0, 3] - over_white((0, 128, 0), 64)).max() <= 1
    # the half-transparent blue really is a blend, neither the colour nor the background
    assert 120 <= loaded[0, 2, 0] <= 135 and loaded[0, 2, 2] == 255


def test_gray_with_alpha_is_composited_onto_white(tmp_path):
    pixels = np.array([[(0, 0), (0, 255), (100, 128)]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(pixels, mode="LA").save(path)

    loaded = assert_rgb_image(load_image(path), (3, 1))

    assert tuple(loaded[0, 0]) == WHITE
    assert tuple(loaded[0, 1]) == (0, 0, 0)
    assert np.abs(loaded[0, 2] - over_white((100, 100, 100), 128)).max() <= 1


def _palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    picture = Image.fromarray(indices.astype(np.uint8), mode="P")
    picture.putpalette([channel for colour in colours for channel in colour])
    return picture


def test_palette_png_with_per_entry_alpha_is_composited_onto_white(tmp_path):
    colours = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    path = tmp_path / "palette_alpha.png"
    # entry 0 fully transparent, entry 1 opaque, entry 2 half transparent
    _palette_image(np.array([[0, 1, 2]]), colours).save(path, transparency=bytes([0, 255, 128]))
    assert Image.open(path).mode == "P"

    loaded = assert_rgb_image(load_image(path), (3, 1))

    assert tuple(loaded[0, 0]) == WHITE  # its palette colour is black: transparency must win
    assert tuple(loaded[0, 1]) == RED
    assert np.abs(loaded[0, 2] - over_white((0, 0, 255), 128)).max() <= 1


def test_gif_transparent_index_becomes_white(tmp_path):
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    path = tmp_path / "transparent.gif"
    _palette_image(np.array([[0, 1], [2, 0]]), colours).save(path, transparency=0)

    loaded = assert_rgb_image(load_image(path), (2, 2))

    assert tuple(loaded[0, 0]) == WHITE
    assert tuple(loaded[1, 1]) == WHITE
    assert tuple(loaded[0, 1]) == RED
    assert tuple(loaded[1, 0]) == GREEN


def test_grayscale_png_with_transparent_value_is_composited(tmp_path):
    path = tmp_path / "gray_trns.png"
    Image.fromarray(np.array([[7, 200]], dtype=np.uint8), mode="L").save(path, transparency=7)

    loaded = assert_rgb_image(load_image(path), (2, 1))

    assert tuple(loaded[0, 0]) == WHITE
    assert tuple(loaded[0, 1]) == (200, 200, 200)


def test_rgb_png_with_transparent_colour_is_composited(tmp_path):
    path = tmp_path / "rgb_trns.png"
    pixels = np.array([[(1, 2, 3), (200, 0, 0)]], dtype=np.uint8)
    Image.fromarray(pixels).save(path, transparency=(1, 2, 3))

    loaded = assert_rgb_image(load_image(path), (2, 1))

    assert tuple(loaded[0, 0]) == WHITE
    assert tuple(loaded[0, 1]) == (200, 0, 0)


# ------------------------------------------------------------ 16 bit and CMYK


SIXTEEN_BIT_VALUES = np.array([[0, 257, 1000, 32768], [40000, 65279, 65534, 65535]], dtype=np.uint16)


def _expected_eight_bit(values: np.ndarray) -> np.ndarray:
    # 65535 -> 255: divide by 257 (= 65535 / 255) and round
    return np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(int)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(SIXTEEN_BIT_VALUES).save(path)
    assert Image.open(path).mode in {"I;16", "I;16B", "I"}

    loaded = assert_rgb_image(load_image(path), (4, 2))

    expected = _expected_eight_bit(SIXTEEN_BIT_VALUES)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], expected)
    assert loaded[0, 3, 0] in (127, 128)  # 32768 is mid-grey, not saturated
    assert loaded[1, 3, 0] == 255 and loaded[0, 0, 0] == 0
    assert len(np.unique(loaded[..., 0])) == len(np.unique(expected))


def test_thirty_two_bit_integer_tiff_in_sixteen_bit_range_is_scaled(tmp_path):
    path = tmp_path / "gray32.tif"
    Image.fromarray(SIXTEEN_BIT_VALUES.astype(np.int32), mode="I").save(path)
    assert Image.open(path).mode == "I"

    loaded = assert_rgb_image(load_image(path), (4, 2))

    np.testing.assert_array_equal(loaded[..., 1], _expected_eight_bit(SIXTEEN_BIT_VALUES))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((24, 32, 4), dtype=np.uint8)
    cmyk[:12, :16] = (0, 255, 255, 0)  # red
    cmyk[:12, 16:] = (255, 0, 255, 0)  # green
    cmyk[12:, :16] = (255, 255, 0, 0)  # blue
    cmyk[12:, 16:] = (0, 0, 0, 0)  # white
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    loaded = assert_rgb_image(load_image(path), (32, 24))

    expected = {(8, 6): RED, (24, 6): GREEN, (8, 18): BLUE, (24, 18): WHITE}
    for (x, y), colour in expected.items():
        assert np.abs(loaded[y, x] - np.array(colour)).max() <= 12, (x, y, loaded[y, x], colour)


# ------------------------------------------------------------ EXIF


@pytest.mark.parametrize(
    ("orientation", "quarter_turns_anticlockwise"),
    [(1, 0), (3, 2), (6, -1), (8, 1)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, quarter_turns_anticlockwise):
    stored = np.full((24, 48, 3), 128, dtype=np.uint8)  # 48 wide, 24 high, grey
    stored[:8, :8] = RED  # a marker in the stored top-left corner, on a JPEG block
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95, subsampling=0)

    loaded_image = load_image(path)

    # orientation 6 means "rotate 90 degrees clockwise to display", 8 anticlockwise, 3 half a turn
    expected = np.rot90(stored, k=quarter_turns_anticlockwise).astype(int)
    height, width = expected.shape[:2]
    loaded = assert_rgb_image(loaded_image, (width, height))
    if orientation in (6, 8):
        assert loaded_image.size == (24, 48)
    assert np.abs(loaded - expected).mean() < 4
    marker = np.argwhere(np.all(np.abs(loaded - np.array(RED)) < 40, axis=-1))
    corners = {1: (0, 0), 3: (height - 1, width - 1), 6: (0, width - 1), 8: (height - 1, 0)}
    marker_corner = corners[orientation]
    centre = marker.mean(axis=0)
    assert np.abs(centre - np.array(marker_corner)).max() < 6, (centre, marker_corner)


# ------------------------------------------------------------ animation


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 5), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 3

    loaded = assert_rgb_image(load_image(path), (6, 5))

    np.testing.assert_array_equal(loaded, np.broadcast_to(np.array(RED), (5, 6, 3)))


def test_example_photo_loads_with_its_pixels():
    path = EXAMPLES / "cat.png"
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
        size = reference.size

    loaded = assert_rgb_image(load_image(path), size)

    np.testing.assert_array_equal(loaded, expected)


# ------------------------------------------------------------ decompression-bomb guard


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    checksum = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def _png_header_only(width: int, height: int) -> bytes:
    """A 1-bit grey PNG that claims ``width`` x ``height`` pixels but holds almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def test_small_max_pixels_refuses_image_naming_the_file(tmp_path):
    path = tmp_path / "ten_by_ten.png"
    Image.fromarray(quadrants(10, 10)).save(path)

    with pytest.raises(ImageLoadError) as caught:
        load_image(path, max_pixels=99)

    assert str(path) in str(caught.value)
    assert "99" in str(caught.value)


def test_image_exactly_at_max_pixels_is_accepted(tmp_path):
    path = tmp_path / "ten_by_ten.png"
    Image.fromarray(quadrants(10, 10)).save(path)

    np.testing.assert_array_equal(np.asarray(load_image(path, max_pixels=100)), quadrants(10, 10))


def test_default_limit_is_pillows():
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    assert inspect.signature(load_image).parameters["max_pixels"].default == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("side", [9460, 20_000, 100_000])
def test_default_limit_refuses_huge_image_before_decoding(tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))

    with pytest.raises(ImageLoadError) as caught:
        load_image(path)

    message = str(caught.value)
    assert str(path) in message
    assert "large" in message or "exceeds" in message


def test_default_limit_lets_an_image_just_under_it_through_to_decoding(tmp_path):
    side = 9459  # 9459**2 is just under Pillow's 89_478_485
    assert side * side <= Image.MAX_IMAGE_PIXELS
    path = tmp_path / "just_under.png"
    path.write_bytes(_png_header_only(side, side))

    with pytest.raises(ImageLoadError) as caught:  # the (fake) data is truncated, but the size passed
        load_image(path)

    message = str(caught.value)
    assert str(path) in message
    assert "decompression bomb" not in message and "exceeds" not in message


# ------------------------------------------------------------ errors


def _noise_image(path: Path, **save_kwargs) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, **save_kwargs)


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere" / "missing.png"


def _directory(tmp_path: Path) -> Path:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return folder


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def _truncated_png(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.png"
    _noise_image(path)
    _cut_in_half(path)
    return path


def _truncated_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.jpg"
    _noise_image(path, quality=95)
    _cut_in_half(path)
    return path


def _png_signature_only(tmp_path: Path) -> Path:
    path = tmp_path / "signature.png"
    _noise_image(path)
    path.write_bytes(path.read_bytes()[:20])
    return path


def _text_as_png(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    return path


def _garbage_as_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize(
    "make_bad_file",
    [
        _missing,
        _directory,
        _empty,
        _truncated_png,
        _truncated_jpeg,
        _png_signature_only,
        _text_as_png,
        _garbage_as_jpeg,
    ],
)
def test_unreadable_files_raise_image_load_error_naming_the_file(tmp_path, make_bad_file):
    path = make_bad_file(tmp_path)

    with pytest.raises(ImageLoadError) as caught:
        load_image(path)

    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, GradCAMError)
    assert "\n" not in str(caught.value)


def test_the_files_cut_in_half_were_valid_before(tmp_path):
    """The truncation tests only mean something if the whole files load."""
    for suffix, kwargs in ((".png", {}), (".jpg", {"quality": 95})):
        path = tmp_path / f"whole{suffix}"
        _noise_image(path, **kwargs)
        assert load_image(path).size == (64, 64)


def test_missing_directory_empty_and_non_image_files_are_told_apart(tmp_path):
    """Each kind of bad file gets its own explanation (the file name aside)."""
    reasons = {}
    for make, words in (
        (_missing, ("no such", "not found", "missing", "does not exist")),
        (_directory, ("directory", "not a file", "folder")),
        (_empty, ("empty", "0 bytes")),
        (_text_as_png, ("not an image", "cannot identify", "unrecognised", "unrecognized")),
    ):
        path = make(tmp_path)
        with pytest.raises(ImageLoadError) as caught:
            load_image(path)
        reason = str(caught.value).replace(str(path), "<file>").lower()
        assert any(word in reason for word in words), (make.__name__, reason)
        reasons[make.__name__] = reason
    assert len(set(reasons.values())) == len(reasons)


def test_image_load_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)
    assert issubclass(ImageLoadError, GradCAMError)
