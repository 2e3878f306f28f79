"""gradcam.video: frames from folders, GIFs and video files; evenly sampled frames; GIF and MP4 output.

Each frame's content encodes its number (a uniform colour of 40 k), so order and count are read from
pixels. MP4 is lossy: its colours are compared within 8 levels.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageSequence

import gradcam.video as video
from conftest import require
from gradcam.errors import GradCAMError
from gradcam.video import VIDEO_SUFFIXES, is_video, read_frames, sample_frames, save_animation

SIZE = (32, 24)


def colour(k: int) -> tuple[int, int, int]:
    """Frame k's colour: red 40 k, green 200 - 40 k, blue 90."""
    return (40 * k, 200 - 40 * k, 90)


def frames(count: int = 5, size: tuple[int, int] = SIZE) -> list[Image.Image]:
    return [Image.new("RGB", size, colour(k)) for k in range(count)]


def means(pictures: list[Image.Image]) -> np.ndarray:
    return np.stack(
        [np.asarray(picture.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) for picture in pictures]
    )


def expected(count: int = 5) -> np.ndarray:
    return np.array([colour(k) for k in range(count)], dtype=np.float64)


# ------------------------------------------------------------ folders of frames


def test_folder_frames_come_in_natural_order_and_other_files_are_ignored(tmp_path):
    # Frame k is named f{n}: sorted as text the order would be f1, f10, f11, f2, f9.
    for k, number in enumerate((1, 2, 9, 10, 11)):
        suffix = ".PNG" if number == 9 else ".png"
        Image.new("L", SIZE, 40 * k).save(tmp_path / f"f{number}{suffix}")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub.png").mkdir()  # a folder, not a frame
    got = read_frames(tmp_path)
    assert [picture.mode for picture in got] == ["RGB"] * 5
    np.testing.assert_array_equal(means(got), [[40 * k] * 3 for k in range(5)])
    assert is_video(tmp_path)


def test_a_folder_without_frames_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a frame")
    assert not is_video(tmp_path)
    with pytest.raises(GradCAMError, match="no frame images"):
        read_frames(tmp_path)


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(GradCAMError, match="no such video"):
        read_frames(tmp_path / "gone.mp4")


def test_is_video_goes_by_suffix_for_files(tmp_path):
    assert all(is_video(tmp_path / f"clip{suffix.upper()}") for suffix in VIDEO_SUFFIXES)
    assert not is_video(tmp_path / "picture.png")
    assert not is_video(tmp_path / "clip")


# ------------------------------------------------------------ sample_frames


def test_sample_frames_spreads_over_the_clip_first_and_last_included():
    assert sample_frames(list(range(10)), 4) == [0, 3, 6, 9]
    assert sample_frames(list(range(10)), 1) == [0]
    assert sample_frames(list(range(7)), 7) == list(range(7))


def test_sample_frames_repeats_frames_of_a_short_clip():
    # linspace(0, 2, 5) = 0, 0.5, 1, 1.5, 2, rounded half to even: 0, 0, 1, 2, 2.
    assert sample_frames(["a", "b", "c"], 5) == ["a", "a", "b", "c", "c"]


def test_sample_frames_refuses_bad_counts_and_an_empty_clip():
    with pytest.raises(GradCAMError, match="at least 1"):
        sample_frames([1, 2], 0)
    with pytest.raises(GradCAMError, match="empty clip"):
        sample_frames([], 3)


# ------------------------------------------------------------ GIF


def test_gif_is_animated_loops_and_keeps_each_frames_colour(tmp_path):
    target = tmp_path / "clip.gif"
    assert save_animation(frames(), target, fps=10.0) == target
    with Image.open(target) as gif:
        assert gif.n_frames == 5 and gif.is_animated
        assert gif.info["loop"] == 0 and gif.info["duration"] == 100
        # Converted one by one: the iterator hands out the one image, seeked to each frame in turn.
        decoded = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
    np.testing.assert_allclose(means(decoded), expected(), atol=1)
    np.testing.assert_allclose(means(read_frames(target)), expected(), atol=1)
    assert os.listdir(tmp_path) == ["clip.gif"]


def test_gif_reads_without_pyav(tmp_path, monkeypatch):
    save_animation(frames(3), tmp_path / "clip.gif")
    monkeypatch.setitem(sys.modules, "av", None)
    np.testing.assert_allclose(means(read_frames(tmp_path / "clip.gif")), expected(3), atol=1)


def test_gif_that_fails_to_encode_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk on fire"):
        save_animation(frames(), tmp_path / "clip.gif")
    assert os.listdir(tmp_path) == []


def test_a_file_that_is_not_a_gif_is_refused_by_name(tmp_path):
    bad = tmp_path / "broken.gif"
    bad.write_bytes(b"GIF89a but nothing after")
    with pytest.raises(GradCAMError, match="broken.gif") as caught:
        read_frames(bad)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------ MP4 (PyAV)


def test_mp4_round_trip_keeps_count_colour_and_rate(tmp_path):
    av = require("av", "MP4 needs PyAV")
    target = tmp_path / "clip.mp4"
    save_animation(frames(), target, fps=8.0)
    got = read_frames(target)
    assert len(got) == 5 and {picture.size for picture in got} == {SIZE}
    np.testing.assert_allclose(means(got), expected(), atol=8)
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8 and stream.codec_context.pix_fmt == "yuv420p"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_mp4_of_odd_size_is_padded_by_one_pixel(tmp_path):
    require("av", "MP4 needs PyAV")
    save_animation(frames(3, (33, 25)), tmp_path / "odd.mp4", fps=5)
    got = read_frames(tmp_path / "odd.mp4")
    assert len(got) == 3 and {picture.size for picture in got} == {(34, 26)}
    np.testing.assert_allclose(means(got), expected(3), atol=8)  # padding repeats the edge colour


def test_mp4_falls_back_to_mpeg4_and_says_when_no_encoder_is_there(tmp_path, monkeypatch):
    av = require("av", "MP4 needs PyAV")
    monkeypatch.setattr(video, "MP4_CODECS", ("no-such-codec", "mpeg4"))
    save_animation(frames(), tmp_path / "clip.mp4")
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    np.testing.assert_allclose(means(read_frames(tmp_path / "clip.mp4")), expected(), atol=8)
    monkeypatch.setattr(video, "MP4_CODECS", ("no-such-codec",))
    with pytest.raises(GradCAMError, match="no-such-codec"):
        save_animation(frames(), tmp_path / "other.mp4")
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_mp4_that_fails_to_encode_leaves_no_file_and_keeps_an_old_one(tmp_path, monkeypatch):
    require("av", "MP4 needs PyAV")
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"the old video")
    calls = []
    real = video._even_pixels

    def failing(frame):
        calls.append(frame)
        if len(calls) == 3:  # mid-way: the container is open and two frames went to the encoder
            raise RuntimeError("encoder died")
        return real(frame)

    monkeypatch.setattr(video, "_even_pixels", failing)
    with pytest.raises(RuntimeError, match="encoder died"):
        save_animation(frames(), target)
    assert os.listdir(tmp_path) == ["clip.mp4"] and target.read_bytes() == b"the old video"
    target.unlink()
    calls.clear()
    with pytest.raises(RuntimeError, match="encoder died"):
        save_animation(frames(), target)
    assert os.listdir(tmp_path) == []


def test_a_file_that_is_not_a_video_is_refused_by_name(tmp_path):
    require("av", "video files need PyAV")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video at all" * 10)
    with pytest.raises(GradCAMError, match="broken.mp4") as caught:
        read_frames(bad)
    assert "\n" not in str(caught.value)


def test_missing_pyav_is_one_line_telling_the_extra(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "av", None)
    for call in (
        lambda: read_frames(tmp_path / "clip.mp4"),
        lambda: save_animation(frames(), tmp_path / "x.mp4"),
    ):
        with pytest.raises(GradCAMError, match=r"pip install 'gradcam\[video\]'") as caught:
            call()
        assert "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == ["clip.mp4"]


# ------------------------------------------------------------ bad requests


def test_save_animation_refuses_bad_suffix_frames_and_rate(tmp_path):
    with pytest.raises(GradCAMError, match=r"\.gif or \.mp4"):
        save_animation(frames(), tmp_path / "clip.avi")
    with pytest.raises(GradCAMError, match="at least one frame"):
        save_animation([], tmp_path / "clip.gif")
    with pytest.raises(GradCAMError, match=r"frame 1 is \(8, 8\)"):
        save_animation([*frames(1), *frames(1, (8, 8))], tmp_path / "clip.gif")
    for fps in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(GradCAMError, match="fps"):
            save_animation(frames(), tmp_path / "clip.gif", fps=fps)
    assert os.listdir(tmp_path) == []
