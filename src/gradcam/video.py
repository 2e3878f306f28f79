"""Video input and animated output: frames of a video file or a folder of frame images, evenly sampled
frames, and animations written as GIF (Pillow) or MP4 (PyAV), atomically.

PyAV (``pip install 'gradcam[video]'``) is imported only when a video file other than a GIF is read or
an MP4 is written.
"""

from __future__ import annotations

import io as _io
import math
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import numpy as np
from PIL import Image, ImageSequence

from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes
from gradcam.io import load_image

#: Suffixes read as video files (lower case).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
#: Suffixes of the frame images a folder of frames holds (lower case).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Suffixes :func:`save_animation` writes.
ANIMATION_SUFFIXES = (".gif", ".mp4")
#: MP4 encoders tried in this order; the first the installed PyAV (its FFmpeg) has is used.
MP4_CODECS = ("libx264", "mpeg4")

T = TypeVar("T")


def _av() -> ModuleType:
    """PyAV, imported on first use."""
    try:
        import av
    except ImportError:
        raise GradCAMError("video files need PyAV: pip install 'gradcam[video]'") from None
    return av


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the digit runs of a name by value: frame2 before frame10."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in parts if part)


def _frame_files(folder: Path) -> list[Path]:
    """The frame images in ``folder`` (not its subfolders), in natural order of their names."""
    files = [
        entry for entry in folder.iterdir() if entry.suffix.lower() in FRAME_SUFFIXES and entry.is_file()
    ]
    return sorted(files, key=lambda entry: (_natural_key(entry.name), entry.name))


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a video: a file named with one of :data:`VIDEO_SUFFIXES` (whether or not it
    exists yet) or a folder that holds frame images."""
    target = Path(path)
    if target.is_dir():
        return bool(_frame_files(target))
    return target.suffix.lower() in VIDEO_SUFFIXES


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_gif(file: Path) -> list[Image.Image]:
    """The frames of an (animated) GIF, through Pillow, as RGB."""
    try:
        with Image.open(file) as image:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise GradCAMError(f"{file}: cannot decode the GIF ({_one_line(error)})") from None


def _read_video(file: Path) -> list[Image.Image]:
    """The frames of the first video stream of ``file``, through PyAV, as RGB."""
    av = _av()
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise GradCAMError(f"{file}: no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            return [frame.to_image() for frame in container.decode(stream)]
    except (av.error.FFmpegError, OSError, ValueError) as error:
        if isinstance(error, GradCAMError):
            raise
        raise GradCAMError(f"{file}: cannot decode the video ({_one_line(error)})") from None


def read_frames(path: str | os.PathLike[str]) -> list[Image.Image]:
    """The RGB frames of a video file or of a folder of frame images.

    A folder's frames are its files named with one of :data:`FRAME_SUFFIXES`, in natural order
    (frame2 before frame10), each read as :func:`gradcam.io.load_image` reads an image; other files are
    ignored. A GIF is read with Pillow, any other file with PyAV. Every frame is decoded and held in
    memory: pick frames with :func:`sample_frames` afterwards.

    Raises:
        GradCAMError: the path is missing, a folder holds no frame images, or a file cannot be decoded
            (the message names the file); also when PyAV is needed and not installed.
    """
    target = Path(path)
    if target.is_dir():
        files = _frame_files(target)
        if not files:
            raise GradCAMError(
                f"{target}: no frame images in the folder (expected {', '.join(FRAME_SUFFIXES)})"
            )
        return [load_image(file) for file in files]
    if not target.is_file():
        raise GradCAMError(f"{target}: no such video file or folder of frames")
    frames = _read_gif(target) if target.suffix.lower() == ".gif" else _read_video(target)
    if not frames:
        raise GradCAMError(f"{target}: the video holds no frames")
    return frames


def sample_frames(frames: Sequence[T], count: int) -> list[T]:
    """``count`` frames evenly spaced over the clip, first and last included: the frames at indices
    round(linspace(0, len - 1, count)). A clip shorter than ``count`` gives repeated frames."""
    if count < 1:
        raise GradCAMError(f"frame count must be at least 1, got {count}")
    if not frames:
        raise GradCAMError("cannot sample frames from an empty clip")
    indices = np.round(np.linspace(0, len(frames) - 1, count)).astype(int)
    return [frames[index] for index in indices]


def _check_frames(frames: Sequence[Image.Image], fps: float) -> None:
    if not frames:
        raise GradCAMError("an animation needs at least one frame, got none")
    if not (math.isfinite(fps) and fps > 0):
        raise GradCAMError(f"fps must be a positive number, got {fps}")
    size = frames[0].size
    for index, frame in enumerate(frames):
        if frame.size != size:
            raise GradCAMError(f"frames must be of one size: frame {index} is {frame.size}, frame 0 {size}")


def _encode_gif(frames: Sequence[Image.Image], fps: float) -> bytes:
    """An endlessly looping animated GIF; each frame lasts round(1000 / fps) ms."""
    pictures = [frame.convert("RGB") for frame in frames]
    buffer = _io.BytesIO()
    pictures[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        loop=0,
        duration=max(1, round(1000 / fps)),
    )
    return buffer.getvalue()


def _mp4_codec(av: ModuleType) -> str:
    """The first of :data:`MP4_CODECS` the installed PyAV can encode with."""
    for name in MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError):
            continue
        return name
    raise GradCAMError(f"the installed PyAV has none of the MP4 encoders {', '.join(MP4_CODECS)}")


def _even_pixels(frame: Image.Image) -> np.ndarray:
    """A frame's RGB pixels, its last column and row repeated where its width or height is odd
    (yuv420p needs even sizes)."""
    pixels = np.asarray(frame.convert("RGB"))
    height, width = pixels.shape[:2]
    if height % 2 or width % 2:
        pixels = np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(pixels)


def _encode_mp4(frames: Sequence[Image.Image], fps: float) -> bytes:
    """An H.264 (or MPEG-4 part 2) MP4, yuv420p, at ``fps`` frames per second, encoded in memory."""
    av = _av()
    codec = _mp4_codec(av)
    width, height = frames[0].size
    buffer = _io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        else:
            stream.bit_rate = max(2_000_000, 8 * stream.width * stream.height)
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(_even_pixels(frame), format="rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def save_animation(frames: Sequence[Image.Image], path: str | os.PathLike[str], fps: float = 8.0) -> Path:
    """Write frames of one size as an animation, atomically (never a half-written file at ``path``).

    ``.gif``: an endlessly looping GIF through Pillow, each frame round(1000 / fps) ms (GIF keeps
    hundredths of a second; Pillow merges identical consecutive frames into one longer frame).
    ``.mp4``: H.264 (libx264) or else MPEG-4 part 2 through PyAV, yuv420p; a frame of odd width or
    height gets its last column or row repeated to make it even. The whole file is encoded in memory
    and then written with :func:`gradcam.files.atomic_write_bytes`. Returns the path written.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise GradCAMError(f"{target}: animation must be named .gif or .mp4, got '{target.suffix}'")
    _check_frames(frames, fps)
    data = _encode_gif(frames, fps) if suffix == ".gif" else _encode_mp4(frames, fps)
    return atomic_write_bytes(target, data)
