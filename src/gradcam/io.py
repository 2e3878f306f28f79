"""Image loading and validation: any format Pillow reads, as an 8-bit RGB image, or one clear error."""

from __future__ import annotations

import io as _io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gradcam.errors import ImageLoadError

#: Images with more pixels than this are refused as likely decompression bombs (Pillow's own default).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def image_extensions() -> set[str]:
    """Lower-case file extensions Pillow can read (".jpg", ".png", ...)."""
    return {ext.lower() for ext in Image.registered_extensions()}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
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
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load an image file as an 8-bit RGB ``PIL.Image``.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images are converted
    to RGB (transparency composited onto white; 16-bit values scaled, not clipped); for animated
    files the first frame is used. Images with more than ``max_pixels`` pixels are refused before
    their pixels are decoded.

    Raises:
        ImageLoadError: the file is missing, empty, truncated, not an image or too large; the
            message names the file.
    """
    file = Path(path)
    if not file.exists():
        raise ImageLoadError(f"{file}: no such file", reason="missing")
    if not file.is_file():
        raise ImageLoadError(f"{file}: not a file", reason="missing")
    if file.stat().st_size == 0:
        raise ImageLoadError(f"{file}: empty file", reason="empty")
    return _decode(file, file, max_pixels)


def decode_image(data: bytes, name: str = "upload", *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image held in memory (an upload) exactly as :func:`load_image` reads a file; errors
    name ``name`` (shown to the sender, never used as a path)."""
    if not data:
        raise ImageLoadError(f"{name}: empty file", reason="empty")
    return _decode(_io.BytesIO(data), name, max_pixels)


def _decode(source: Path | _io.BytesIO, file: object, max_pixels: int) -> Image.Image:
    """Open, check the pixel count before decoding, decode, orient and convert to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        f"{file}: {width}x{height} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb)",
                        reason="too-large",
                    )
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return _to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{file}: not an image file Pillow can read", reason="format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(
            f"{file}: image too large (possible decompression bomb)", reason="too-large"
        ) from None
    except PermissionError:
        raise ImageLoadError(f"{file}: permission denied", reason="permission") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{file}: corrupt or truncated image ({error})") from None
