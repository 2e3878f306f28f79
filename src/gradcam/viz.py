"""Pictures of maps: colormapped heatmaps, overlays, the original | heatmap | overlay panel, guided
pictures."""

from __future__ import annotations

import io as _io
import os
import warnings
from pathlib import Path

import imagecodecs
import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from gradcam.errors import GradCAMError
from gradcam.files import atomic_write_bytes

#: Pictures in a panel are reduced to at most this many pixels on their long side.
PANEL_PICTURE_SIZE = 640
#: The map's weight in an overlay: (1 - alpha) * picture + alpha * heatmap.
OVERLAY_ALPHA = 0.5


def _as_array(saliency: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(saliency, torch.Tensor):
        # float32 first: numpy has no bfloat16, so .numpy() on a bfloat16 map would fail.
        array = saliency.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        array = np.asarray(saliency)
    if array.ndim != 2:
        raise GradCAMError(f"map must be 2-D (H,W), got shape {array.shape}")
    return array.astype(np.float32)


def _fit(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a map to ``size`` = (width, height) bilinearly and clip it to [0, 1]."""
    if (saliency.shape[1], saliency.shape[0]) != size:
        resized = Image.fromarray(saliency, mode="F").resize(size, Image.Resampling.BILINEAR)
        saliency = np.asarray(resized, dtype=np.float32)
    return np.clip(saliency, 0.0, 1.0)


def heatmap(saliency: torch.Tensor | np.ndarray, cmap: str = "jet") -> Image.Image:
    """A map with values in [0, 1] as an RGB image through a matplotlib colormap."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise GradCAMError(f"colormap '{cmap}' not found; try jet, viridis, inferno, turbo") from None
    array = np.clip(_as_array(saliency), 0.0, 1.0)
    # Index the colormap's table the way matplotlib does (bin = min(int(x N), N - 1)), with the table
    # rounded to bytes once: no float RGBA image of the whole picture is built.
    table = (colormap(np.arange(colormap.N))[:, :3] * 255).round().astype(np.uint8)
    if colormap.N > 256:
        bins = np.minimum((array * colormap.N).astype(np.int64), colormap.N - 1)
        return Image.fromarray(table[bins], mode="RGB")
    # Up to 256 bins: a palette picture that Pillow expands in C, about 10 times faster than numpy's
    # fancy indexing of the table.
    bins = np.minimum(array * colormap.N, colormap.N - 1).astype(np.uint8)
    picture = Image.frombytes("P", (bins.shape[1], bins.shape[0]), bins.tobytes())
    picture.putpalette(table.tobytes(), "RGB")
    return picture.convert("RGB")


def shrink(picture: Image.Image, size: int) -> Image.Image:
    """Reduce ``picture`` in place to at most ``size`` pixels on its longer side (bilinear, aspect kept;
    0 or a smaller picture: left as it is) and return it. For pictures of our own, such as a frame from
    :meth:`gradcam.models.Preprocess.prepare`."""
    if size and max(picture.size) > size:
        picture.thumbnail((size, size), Image.Resampling.BILINEAR)
    return picture


def overlay(
    image: Image.Image, saliency: torch.Tensor | np.ndarray, cmap: str = "jet", alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """Blend a colormapped map over ``image``: (1 - alpha) * image + alpha * colormap(map).

    The map (values in [0, 1]) is resized bilinearly to the image when their sizes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise GradCAMError(f"alpha must be between 0 and 1, got {alpha}")
    base = image.convert("RGB")
    heat = heatmap(_fit(_as_array(saliency), base.size), cmap)
    return Image.blend(base, heat, alpha)


def panel(
    image: Image.Image,
    saliency: torch.Tensor | np.ndarray,
    title: str = "",
    cmap: str = "jet",
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """Original | heatmap | overlay side by side, titled (e.g. with class name and probability).

    Large images are first reduced to at most PANEL_PICTURE_SIZE pixels on their long side; the map is
    resized to the picture and colormapped once (see :func:`compose_panel`).
    """
    base = image.convert("RGB")
    if max(base.size) > PANEL_PICTURE_SIZE:
        base = base.copy()
        base.thumbnail((PANEL_PICTURE_SIZE, PANEL_PICTURE_SIZE), Image.Resampling.BILINEAR)
    if not 0.0 <= alpha <= 1.0:
        raise GradCAMError(f"alpha must be between 0 and 1, got {alpha}")
    heat = heatmap(_fit(_as_array(saliency), base.size), cmap)
    return compose_panel(base, heat, Image.blend(base, heat, alpha), title)


def compose_panel(
    picture: Image.Image, heat: Image.Image, blended: Image.Image, title: str = ""
) -> Image.Image:
    """Three pictures of one size (the picture, its heatmap, their overlay) side by side on white, with
    the title as plain text above them, drawn directly (no figure, no PNG round trip)."""
    width, height = picture.size
    gap = max(4, min(width, height) // 40)
    font = ImageFont.load_default(size=max(10, min(18, height // 14)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = draw.textbbox((0, 0), "Ag", font=font)[3] + 2 * gap  # the same with or without a title
    canvas = Image.new("RGB", (3 * width + 4 * gap, height + top + gap), (255, 255, 255))
    for index, part in enumerate((picture, heat, blended)):
        canvas.paste(part.convert("RGB"), (gap + index * (width + gap), top))
    if title:
        ImageDraw.Draw(canvas).text((canvas.width // 2, gap), title, fill=(0, 0, 0), font=font, anchor="mt")
    return canvas


def save_figure(figure: Figure, path: str | os.PathLike[str], *, tight: bool = True) -> Path:
    """Render a matplotlib figure (Agg, no pyplot state) to a PNG written atomically; ``tight`` applies
    ``tight_layout`` first (leave it False for a figure laid out by hand)."""
    FigureCanvasAgg(figure)
    buffer = _io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        if tight:
            figure.tight_layout()
        figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def encode_png(picture: Image.Image) -> bytes:
    """A picture as PNG bytes, encoded for speed: zlib level 1, run-length strategy, the Sub row filter.

    These are the fast settings imagecodecs documents (OpenCV's). Pillow offers no choice of filter and
    tries all five on every row: a 512x384 overlay takes about 18 ms at its level 1 against 6 ms here,
    for a file of the same size (about 280 kB). Modes libpng cannot take directly go through Pillow.
    """
    if picture.mode in ("L", "LA", "RGB", "RGBA"):
        return imagecodecs.png_encode(
            np.asarray(picture),
            level=imagecodecs.PNG.COMPRESSION.SPEED,
            strategy=imagecodecs.PNG.STRATEGY.RLE,
            filter=imagecodecs.PNG.FILTER.SUB,
        )
    buffer = _io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(picture: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write a PNG atomically: never a half-written file at ``path``."""
    return atomic_write_bytes(path, encode_png(picture))


def guided_image(gradient: torch.Tensor | np.ndarray) -> Image.Image:
    """A (3,H,W) input-space gradient as an RGB picture, normalised for display the usual way.

    As in the Grad-CAM authors' code: centre on the mean, divide by the standard deviation, scale by 0.1,
    shift to 0.5 and clip to [0, 1]: x' = clip(0.5 + 0.1 (x - mean) / (std + 1e-5), 0, 1).
    """
    array = (
        gradient.detach().to("cpu", torch.float32).numpy()
        if isinstance(gradient, torch.Tensor)
        else (np.asarray(gradient, dtype=np.float32))
    )
    if array.ndim != 3 or array.shape[0] != 3:
        raise GradCAMError(f"guided gradient must be (3,H,W), got shape {array.shape}")
    scaled = 0.5 + 0.1 * (array - array.mean()) / (array.std() + 1e-5)
    pixels = (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
