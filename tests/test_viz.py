"""gradcam.viz pictures and gradcam.files atomic writes.

Expected colours come from matplotlib's colormap called here directly (or from the jet colormap's known
end points), expected blends from numpy arithmetic written here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import gradcam.files as files_module
from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes, save_npy
from gradcam.viz import heatmap, overlay, panel, save_png

DARK_RED, DARK_BLUE = (128, 0, 0), (0, 0, 128)  # jet(1.0) = (0.5, 0, 0), jet(0.0) = (0, 0, 0.5)


def colour_of(value: float, cmap: str = "jet") -> np.ndarray:
    """The 8-bit colour matplotlib gives ``value``, straight from matplotlib."""
    return np.round(np.array(matplotlib.colormaps[cmap](float(value))[:3]) * 255).astype(int)


def colours_of(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    return np.stack([colour_of(v, cmap) for v in np.asarray(values, dtype=np.float64).ravel()]).reshape(
        *np.shape(values), 3
    )


def random_image(width: int = 12, height: int = 8, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array), array.astype(int)


def random_map(width: int = 12, height: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)).astype(np.float32)


def as_int(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(int)


def only_file(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------ heatmap


def test_heatmap_end_points_are_jets_dark_blue_and_dark_red():
    picture = heatmap(np.array([[0.0, 1.0]], dtype=np.float32))

    assert picture.mode == "RGB"
    assert picture.size == (2, 1)
    low, high = as_int(picture)[0]
    assert tuple(low) == DARK_BLUE
    assert tuple(high) == DARK_RED  # RGB order: red channel high, blue ~0
    np.testing.assert_array_equal(low, colour_of(0.0))
    np.testing.assert_array_equal(high, colour_of(1.0))


def test_heatmap_matches_matplotlib_pixel_by_pixel_and_keeps_orientation():
    values = np.array([[0.0, 0.1, 0.25], [0.5, 0.75, 1.0]], dtype=np.float32)  # 3 wide, 2 high

    picture = heatmap(values)

    assert picture.size == (3, 2)
    np.testing.assert_array_equal(as_int(picture), colours_of(values))
    assert tuple(as_int(picture)[1, 2]) == DARK_RED  # value 1.0 sits bottom-right
    assert tuple(as_int(picture)[0, 0]) == DARK_BLUE


@pytest.mark.parametrize("cmap", ["viridis", "inferno", "gray", "turbo"])
def test_heatmap_other_colormaps(cmap):
    values = random_map(5, 4)

    np.testing.assert_array_equal(as_int(heatmap(values, cmap)), colours_of(values, cmap))


@pytest.mark.parametrize("entries", [10, 256, 1000])
def test_heatmap_matches_matplotlib_for_tables_of_any_length(entries):
    name = f"test-jet-{entries}"
    matplotlib.colormaps.register(matplotlib.colormaps["jet"].resampled(entries), name=name)
    try:
        # Bin edges and their float32 neighbours, where a rounding slip would pick the next colour.
        edges = np.arange(entries + 1, dtype=np.float32) / entries
        values = np.concatenate(
            [edges, np.nextafter(edges, 0), np.nextafter(edges, 1), random_map(9, 9).ravel()]
        )
        values = np.clip(values, 0, 1).astype(np.float32)[None, :]
        # The oracle is matplotlib on the float32 map itself (it bins in the array's own precision).
        expected = np.round(matplotlib.colormaps[name](values)[..., :3] * 255).astype(int)
        np.testing.assert_array_equal(as_int(heatmap(values, name)), expected)
    finally:
        matplotlib.colormaps.unregister(name)


def test_heatmap_gray_colormap_is_the_value_times_255():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)

    pixels = as_int(heatmap(values, "gray"))[0]

    assert tuple(pixels[0]) == (0, 0, 0)
    assert tuple(pixels[2]) == (255, 255, 255)
    assert np.all(np.abs(pixels[1] - 127.5) <= 1.5)


def test_heatmap_clips_values_outside_zero_one():
    pixels = as_int(heatmap(np.array([[-3.0, -0.01, 1.01, 7.0]], dtype=np.float32)))[0]

    assert tuple(pixels[0]) == tuple(pixels[1]) == DARK_BLUE
    assert tuple(pixels[2]) == tuple(pixels[3]) == DARK_RED


def test_heatmap_accepts_tensors_like_arrays():
    values = random_map(6, 3)

    from_numpy = as_int(heatmap(values))
    np.testing.assert_array_equal(as_int(heatmap(torch.from_numpy(values))), from_numpy)
    np.testing.assert_array_equal(as_int(heatmap(torch.from_numpy(values).requires_grad_())), from_numpy)
    np.testing.assert_array_equal(as_int(heatmap(values.astype(np.float64))), from_numpy)
    np.testing.assert_array_equal(from_numpy, colours_of(values))


def test_heatmap_accepts_half_precision_tensors():
    values = torch.tensor([[0.0, 0.5, 1.0]])

    for dtype in (torch.float16, torch.bfloat16):
        pixels = as_int(heatmap(values.to(dtype)))[0]
        np.testing.assert_array_equal(pixels, colours_of(values.numpy()[0]))


def test_heatmap_unknown_colormap_is_a_gradcam_error():
    with pytest.raises(GradCAMError, match="no-such-map"):
        heatmap(np.zeros((2, 2)), "no-such-map")
    assert issubclass(GradCAMError, ValueError)


@pytest.mark.parametrize("shape", [(4,), (1, 4, 4), (3, 4, 4), (1, 1, 4, 4)])
def test_heatmap_refuses_maps_that_are_not_two_dimensional(shape):
    with pytest.raises(GradCAMError, match="2-D"):
        heatmap(np.zeros(shape, dtype=np.float32))


# ------------------------------------------------------------ overlay


def test_overlay_alpha_zero_is_the_image():
    image, pixels = random_image()

    result = overlay(image, random_map(), alpha=0.0)

    assert result.mode == "RGB" and result.size == image.size
    np.testing.assert_array_equal(as_int(result), pixels)


def test_overlay_alpha_one_is_the_heatmap():
    image, _ = random_image()
    values = random_map()

    np.testing.assert_array_equal(as_int(overlay(image, values, alpha=1.0)), colours_of(values))


@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.8])
def test_overlay_is_the_weighted_mean(alpha):
    image, pixels = random_image()
    values = random_map()

    result = as_int(overlay(image, values, alpha=alpha))

    expected = (1.0 - alpha) * pixels + alpha * colours_of(values)
    assert np.abs(result - expected).max() <= 1.0


def test_overlay_default_alpha_is_half_and_default_colormap_jet():
    image, pixels = random_image()
    values = random_map()

    result = as_int(overlay(image, values))

    assert np.abs(result - (pixels + colours_of(values, "jet")) / 2.0).max() <= 1.0


def test_overlay_uses_the_requested_colormap():
    image, _ = random_image()
    values = random_map()

    np.testing.assert_array_equal(
        as_int(overlay(image, values, cmap="viridis", alpha=1.0)), colours_of(values, "viridis")
    )


def test_overlay_converts_non_rgb_images():
    gray = np.arange(96, dtype=np.uint8).reshape(8, 12)
    values = random_map()

    result = overlay(Image.fromarray(gray, mode="L"), values, alpha=0.0)

    assert result.mode == "RGB"
    np.testing.assert_array_equal(as_int(result), np.repeat(gray[..., None], 3, axis=-1))


def test_overlay_resizes_a_constant_map_to_the_image():
    image, pixels = random_image(40, 30)

    result = overlay(image, np.full((7, 7), 0.5, dtype=np.float32), alpha=1.0)

    assert result.size == (40, 30)
    np.testing.assert_array_equal(as_int(result), np.broadcast_to(colour_of(0.5), (30, 40, 3)))


def test_overlay_resizes_a_map_keeping_its_layout():
    # left half cold, right half hot; the map is 8 x 4, the image 64 x 48: the halves must stay put
    values = np.zeros((4, 8), dtype=np.float32)
    values[:, 4:] = 1.0
    image, _ = random_image(64, 48)

    result = as_int(overlay(image, values, alpha=1.0))

    assert result.shape == (48, 64, 3)
    np.testing.assert_array_equal(result[:, :20], np.broadcast_to(DARK_BLUE, (48, 20, 3)))
    np.testing.assert_array_equal(result[:, -20:], np.broadcast_to(DARK_RED, (48, 20, 3)))
    # bilinear: between the halves the colours pass through the middle of the colormap
    middle_row = result[24]
    assert any(np.abs(pixel - colour_of(0.5)).max() <= 60 for pixel in middle_row[24:40])


def test_overlay_resizes_tall_maps_to_wide_images_without_transposing():
    values = np.zeros((8, 2), dtype=np.float32)
    values[:4] = 1.0  # top half hot
    image, _ = random_image(30, 20)

    result = as_int(overlay(image, values, alpha=1.0))

    np.testing.assert_array_equal(result[:6], np.broadcast_to(DARK_RED, (6, 30, 3)))
    np.testing.assert_array_equal(result[-6:], np.broadcast_to(DARK_BLUE, (6, 30, 3)))


def test_overlay_clips_map_values():
    image, _ = random_image()
    values = np.full((8, 12), 5.0, dtype=np.float32)
    values[:, :6] = -2.0

    result = as_int(overlay(image, values, alpha=1.0))

    np.testing.assert_array_equal(result[:, :6], np.broadcast_to(DARK_BLUE, (8, 6, 3)))
    np.testing.assert_array_equal(result[:, 6:], np.broadcast_to(DARK_RED, (8, 6, 3)))


def test_overlay_tensor_and_array_maps_agree():
    image, _ = random_image()
    values = random_map()

    from_array = as_int(overlay(image, values, alpha=0.4))
    np.testing.assert_array_equal(as_int(overlay(image, torch.from_numpy(values), alpha=0.4)), from_array)
    small = random_map(3, 2)
    np.testing.assert_array_equal(
        as_int(overlay(image, torch.from_numpy(small), alpha=1.0)), as_int(overlay(image, small, alpha=1.0))
    )


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 2.0, -1.0, float("nan")])
def test_overlay_refuses_alpha_outside_zero_one(alpha):
    image, _ = random_image()
    with pytest.raises(GradCAMError, match="alpha"):
        overlay(image, random_map(), alpha=alpha)


@pytest.mark.parametrize("shape", [(8,), (1, 8, 12), (2, 8, 12)])
def test_overlay_refuses_maps_that_are_not_two_dimensional(shape):
    image, _ = random_image()
    with pytest.raises(GradCAMError, match="2-D"):
        overlay(image, np.zeros(shape, dtype=np.float32))
    with pytest.raises(GradCAMError, match="2-D"):
        overlay(image, torch.zeros(shape))


def test_overlay_unknown_colormap_is_a_gradcam_error():
    image, _ = random_image()
    with pytest.raises(GradCAMError, match="colormap"):
        overlay(image, random_map(), cmap="not-a-colormap")


# ------------------------------------------------------------ panel


def count_near(pixels: np.ndarray, colour, tolerance: int = 2) -> int:
    return int(np.all(np.abs(pixels - np.array(colour)) <= tolerance, axis=-1).sum())


def test_panel_is_a_wide_rgb_picture_showing_image_heatmap_and_overlay():
    white = Image.new("RGB", (32, 32), (255, 255, 255))

    picture = panel(white, np.ones((32, 32), dtype=np.float32))

    assert picture.mode == "RGB"
    assert picture.width > picture.height
    pixels = as_int(picture)
    blended = np.floor((np.array([255, 255, 255]) + np.array(DARK_RED)) / 2)  # the overlay of hot on white
    assert count_near(pixels, DARK_RED) > 500  # the heatmap
    assert count_near(pixels, blended) > 500  # the overlay
    assert count_near(pixels, DARK_BLUE) == 0


def test_panel_colours_follow_the_map():
    image, _ = random_image(32, 32)

    hot = as_int(panel(image, np.ones((32, 32), dtype=np.float32)))
    cold = as_int(panel(image, np.zeros((32, 32), dtype=np.float32)))

    assert hot.shape == cold.shape
    assert count_near(cold, DARK_BLUE) > 500 and count_near(cold, DARK_RED) < 50
    assert count_near(hot, DARK_RED) > 500 and count_near(hot, DARK_BLUE) < 50
    assert np.abs(hot - cold).sum(axis=-1).astype(bool).sum() > 1000


def test_panel_is_not_blank_and_differs_between_maps():
    image, _ = random_image(32, 32)
    gradient = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))

    first = as_int(panel(image, gradient))
    second = as_int(panel(image, gradient.T))

    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 50
    assert not np.array_equal(first, second)


def test_panel_shows_the_title():
    image, _ = random_image(32, 32)
    values = random_map(32, 32)

    untitled = as_int(panel(image, values))
    titled = as_int(panel(image, values, title="tabby cat 0.93"))

    assert untitled.shape == titled.shape
    assert not np.array_equal(untitled, titled)


def test_panel_accepts_tensor_maps_of_another_size_and_follows_the_aspect():
    square = panel(Image.new("RGB", (32, 32), (0, 0, 0)), torch.ones(7, 7))
    tall = panel(Image.new("RGB", (16, 64), (0, 0, 0)), torch.ones(7, 7))

    assert count_near(as_int(square), DARK_RED) > 500
    assert tall.height > square.height
    assert tall.height / tall.width > square.height / square.width


def test_panel_refuses_bad_maps():
    image, _ = random_image(16, 16)
    with pytest.raises(GradCAMError):
        panel(image, np.zeros((1, 16, 16), dtype=np.float32))
    with pytest.raises(GradCAMError):
        panel(image, np.zeros((16, 16), dtype=np.float32), cmap="nope")


# ------------------------------------------------------------ save_png and files


def test_save_png_round_trips_exactly_and_leaves_no_temporary_file(tmp_path):
    image, pixels = random_image(13, 7)
    target = tmp_path / "out" / "nested" / "picture.png"

    returned = save_png(image, target)

    assert returned == target
    with Image.open(target) as reread:
        assert reread.format == "PNG"
        assert reread.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(reread).astype(int), pixels)
    assert only_file(target.parent) == ["picture.png"]


def test_save_png_keeps_alpha_and_accepts_string_paths(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    target = tmp_path / "alpha.png"

    save_png(Image.fromarray(rgba, mode="RGBA"), str(target))

    with Image.open(target) as reread:
        assert reread.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(reread), rgba)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "I;16"])
def test_save_png_round_trips_every_mode_pillow_reads_back(tmp_path, mode):
    rng = np.random.default_rng(4)
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 65536, size=(6, 9), dtype=np.uint16))
    else:
        picture = Image.fromarray(rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)).convert(mode)
    target = save_png(picture, tmp_path / f"{mode.replace(';', '')}.png")
    with Image.open(target) as reread:
        assert reread.mode == picture.mode
        np.testing.assert_array_equal(np.asarray(reread), np.asarray(picture))


def test_save_png_overwrites(tmp_path):
    target = tmp_path / "picture.png"
    save_png(Image.new("RGB", (3, 3), (1, 2, 3)), target)

    save_png(Image.new("RGB", (4, 2), (9, 8, 7)), target)

    with Image.open(target) as reread:
        assert reread.size == (4, 2)
        assert reread.getpixel((3, 1)) == (9, 8, 7)
    assert only_file(tmp_path) == ["picture.png"]


def test_save_png_of_an_unencodable_picture_leaves_the_old_file(tmp_path):
    target = tmp_path / "picture.png"
    save_png(Image.new("RGB", (3, 3), (1, 2, 3)), target)
    before = target.read_bytes()

    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (3, 3)), target)  # PNG has no CMYK

    assert target.read_bytes() == before
    assert only_file(tmp_path) == ["picture.png"]


def test_save_png_failing_rename_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "picture.png"
    save_png(Image.new("RGB", (3, 3), (1, 2, 3)), target)
    before = target.read_bytes()

    def failing_replace(source, destination):
        raise OSError("disk on fire")

    monkeypatch.setattr(files_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_png(Image.new("RGB", (3, 3), (200, 0, 0)), target)

    assert target.read_bytes() == before
    assert only_file(tmp_path) == ["picture.png"]


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)) * 1000])
def test_atomic_write_bytes_round_trips(tmp_path, data):
    target = tmp_path / "data.bin"

    returned = atomic_write_bytes(target, data)

    assert returned == target
    assert target.read_bytes() == data
    assert only_file(tmp_path) == ["data.bin"]


def test_atomic_write_bytes_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    atomic_write_bytes(str(target), b"old content that is longer")

    atomic_write_bytes(target, b"new")

    assert target.read_bytes() == b"new"
    assert only_file(target.parent) == ["data.bin"]


def test_atomic_write_bytes_target_holds_old_or_whole_new_content_at_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    new = b"n" * 100_000
    seen = {}
    real_replace = os.replace

    def spying_replace(source, destination):
        seen["target_at_rename"] = target.read_bytes()
        seen["source_at_rename"] = Path(source).read_bytes()
        seen["same_folder"] = os.path.dirname(os.path.abspath(source)) == str(tmp_path)
        real_replace(source, destination)

    monkeypatch.setattr(files_module.os, "replace", spying_replace)
    atomic_write_bytes(target, new)

    assert seen == {"target_at_rename": b"old", "source_at_rename": new, "same_folder": True}
    assert target.read_bytes() == new


@pytest.mark.parametrize("failing", ["replace", "fsync"])
@pytest.mark.parametrize("error", [OSError("no space left"), KeyboardInterrupt()])
def test_atomic_write_bytes_failure_keeps_old_content_and_cleans_up(tmp_path, monkeypatch, failing, error):
    target = tmp_path / "data.bin"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(files_module.os, failing, fail)
    with pytest.raises(type(error)):
        atomic_write_bytes(target, b"replacement")

    assert target.read_bytes() == b"previous"
    assert only_file(tmp_path) == ["data.bin"]


def test_atomic_write_bytes_failing_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "fresh.bin"

    def failing_fdopen(*args, **kwargs):
        raise OSError("cannot open")

    monkeypatch.setattr(files_module.os, "fdopen", failing_fdopen)
    with pytest.raises(OSError, match="cannot open"):
        atomic_write_bytes(target, b"data")

    assert only_file(tmp_path) == []


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_bytes_gives_new_files_ordinary_permissions(tmp_path):
    target = tmp_path / "shared.bin"
    plain = tmp_path / "plain.bin"

    atomic_write_bytes(target, b"x")
    with open(plain, "wb") as handle:
        handle.write(b"x")

    expected = 0o666 & ~_current_umask()
    assert stat.S_IMODE(target.stat().st_mode) == expected
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_bytes_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "private.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)

    atomic_write_bytes(target, b"new")

    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        np.random.default_rng(5).random((2, 3, 4)),
        np.array([True, False, True]),
        np.zeros((0, 5), dtype=np.float16),
    ],
)
def test_save_npy_round_trips_values_dtype_and_shape(tmp_path, array):
    target = tmp_path / "maps" / "map.npy"

    returned = save_npy(array, target)

    assert returned == target
    loaded = np.load(target)
    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)
    assert only_file(target.parent) == ["map.npy"]


def test_save_npy_writes_exactly_the_path_given(tmp_path):
    target = tmp_path / "map.data"

    save_npy(np.array([1.5, 2.5]), target)

    assert only_file(tmp_path) == ["map.data"]
    np.testing.assert_array_equal(np.load(target), [1.5, 2.5])


def test_save_npy_failure_keeps_previous_array(tmp_path, monkeypatch):
    target = tmp_path / "map.npy"
    save_npy(np.array([1.0, 2.0]), target)

    def failing_replace(source, destination):
        raise OSError("read-only file system")

    monkeypatch.setattr(files_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_npy(np.array([9.0, 9.0, 9.0]), target)

    np.testing.assert_array_equal(np.load(target), [1.0, 2.0])
    assert only_file(tmp_path) == ["map.npy"]
