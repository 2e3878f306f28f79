"""Image loading and validation: any format Pillow reads (or those of an allow-list), as an 8-bit RGB
image, or one clear error.

The pixel limit is enforced before any pixel is decoded or allocated. Pillow checks an image's pixel
count (``Image._decompression_bomb_check``) at each point where it is about to allocate pixels: once a
file is identified, and inside ``Image.open`` before a GIF frame's disposal canvas or WebP's decoder
canvas, before a TIFF tile. This module wraps that check once, so that inside its own decoding the same
points also enforce the caller's ``max_pixels`` and report the pixel count to the caller (the service
reserves its pixel budget there). Elsewhere Pillow behaves as it always does.
"""

from __future__ import annotations

import functools
import io as _io
import os
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gradcam.errors import GradCAMError, ImageLoadError

#: Images with more pixels than this are refused as likely decompression bombs (Pillow's own default).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: The formats the service accepts as uploads (Pillow's names; WebP where Pillow was built with it).
#: Everything else (ICO, EPS, PSD, ... every other Pillow plugin) is never tried.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_SHOWN = {"WEBP": "WebP"}


def image_extensions() -> set[str]:
    """Lower-case file extensions Pillow can read (".jpg", ".png", ...)."""
    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass(frozen=True)
class _Limits:
    """What one decoding allows: checked at each of Pillow's pixel checkpoints while it runs."""

    file: object
    max_pixels: int
    reserve: Callable[[int], None] | None

    def check(self, size: tuple[int, int]) -> None:
        width, height = size
        pixels = max(1, width) * max(1, height)
        # Pillow warns above MAX_IMAGE_PIXELS; a warning here is a refusal, as it always was.
        limit = min(self.max_pixels, Image.MAX_IMAGE_PIXELS or self.max_pixels)
        if pixels > limit:
            raise ImageLoadError(
                f"{self.file}: {width}x{height} pixels exceeds the limit of {limit} "
                "(possible decompression bomb)",
                reason="too-large",
            )
        if self.reserve is not None:
            self.reserve(pixels)


_LIMITS: ContextVar[_Limits | None] = ContextVar("gradcam_io_limits", default=None)


def _hook_pillow_check() -> None:
    """Wrap Pillow's pixel check (once per process) so that it also applies :data:`_LIMITS`."""
    current = getattr(Image, "_decompression_bomb_check", None)
    if current is None or getattr(current, "_gradcam", False):
        return  # an unknown Pillow: the explicit check after opening still refuses before decoding

    @functools.wraps(current)
    def checked(size: tuple[int, int], *args: object, **kwargs: object) -> None:
        limits = _LIMITS.get()
        if limits is not None:
            limits.check(size)
        current(size, *args, **kwargs)

    checked._gradcam = True  # type: ignore[attr-defined]
    Image._decompression_bomb_check = checked


_hook_pillow_check()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white. An RGB image is
    returned as it is (no copy)."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's own conversion clips 16-bit values at 255; scale the full range instead.
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # Palette, grayscale and RGB images can carry a transparent colour (PNG tRNS, GIF): honour it.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Load an image file as an 8-bit RGB ``PIL.Image``.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images are converted
    to RGB (transparency composited onto white; 16-bit values scaled, not clipped); for animated
    and multi-page files the first frame is used (no other frame is decoded). Images with more than
    ``max_pixels`` pixels are refused before their pixels are decoded. ``formats`` (Pillow's names, as
    :data:`UPLOAD_FORMATS`) restricts the formats tried; None: every format Pillow reads.

    Raises:
        ImageLoadError: the file is missing, empty, truncated, not an image (of ``formats``) or too
            large; the message names the file.
    """
    file = Path(path)
    if not file.exists():
        raise ImageLoadError(f"{file}: no such file", reason="missing")
    if not file.is_file():
        raise ImageLoadError(f"{file}: not a file", reason="missing")
    if file.stat().st_size == 0:
        raise ImageLoadError(f"{file}: empty file", reason="empty")
    try:
        handle = file.open("rb")
    except PermissionError:
        raise ImageLoadError(f"{file}: permission denied", reason="permission") from None
    with handle:  # ours, not Pillow's: closed once the first frame is decoded
        return _decode(handle, file, max_pixels, formats)


def decode_image(
    data: bytes,
    name: str = "upload",
    *,
    max_pixels: int = MAX_PIXELS,
    formats: Sequence[str] | None = UPLOAD_FORMATS,
    reserve: Callable[[int], None] | None = None,
) -> Image.Image:
    """Decode an image held in memory (an upload) as :func:`load_image` reads a file, of ``formats``
    only (default :data:`UPLOAD_FORMATS`; None: any Pillow reads); errors name ``name`` (shown to the
    sender, never used as a path).

    ``reserve(pixels)``, when given, is called with the image's pixel count before any of its pixels
    are allocated (again, with a larger count, should Pillow announce one); it may raise to refuse.
    """
    if not data:
        raise ImageLoadError(f"{name}: empty file", reason="empty")
    return _decode(_io.BytesIO(data), name, max_pixels, formats, reserve)


def _accepted(formats: Sequence[str] | None) -> tuple[str, ...] | None:
    """The formats of ``formats`` this Pillow can open (WebP may be missing from a build)."""
    if formats is None:
        return None
    Image.init()
    return tuple(f.upper() for f in formats if f.upper() in Image.OPEN)


def _not_an_image(file: object, formats: tuple[str, ...] | None) -> ImageLoadError:
    if formats is None:
        return ImageLoadError(f"{file}: not an image file Pillow can read", reason="format")
    shown = [_SHOWN.get(f, f) for f in formats]
    listed = ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else "".join(shown) or "none"
    return ImageLoadError(f"{file}: not an image in a format read here ({listed})", reason="format")


def _decode(
    source: IO[bytes],
    file: object,
    max_pixels: int,
    formats: Sequence[str] | None,
    reserve: Callable[[int], None] | None = None,
) -> Image.Image:
    """Open (headers only: every pixel checkpoint within the limits), decode the first frame, orient
    and convert to RGB."""
    limits = _Limits(file, max_pixels, reserve)
    accepted = _accepted(formats)
    token = _LIMITS.set(limits)
    try:
        opened = Image.open(source, formats=accepted)
        limits.check(opened.size)  # Pillow checked already; this holds should its hook be missing
        opened.load()
        ImageOps.exif_transpose(opened, in_place=True)
        return _to_rgb(opened)
    except GradCAMError:
        raise
    except UnidentifiedImageError:
        raise _not_an_image(file, accepted) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(
            f"{file}: image too large (possible decompression bomb)", reason="too-large"
        ) from None
    except PermissionError:
        raise ImageLoadError(f"{file}: permission denied", reason="permission") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{file}: corrupt or truncated image ({error})") from None
    finally:
        _LIMITS.reset(token)
