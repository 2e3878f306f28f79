"""Pictures of maps: colormapped heatmaps, overlays, the original | heatmap | overlay panel, guided
pictures; and for other tasks: boxes with captions, mask outlines, strips of video frames."""

from __future__ import annotations

import io as _io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import imagecodecs
import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from skimage.segmentation import find_boundaries

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


# ------------------------------------------------------------ drawing for detection, segmentation, video


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels, or its fixed bitmap font where Pillow cannot scale it
    (before Pillow 10.1, or without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _ink_on(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``color`` (Rec. 601 luma)."""
    red, green, blue = color[:3]
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue >= 128 else (255, 255, 255)


def _box_pixels(box: Sequence[float], index: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A box's corners rounded to pixels and clipped to a picture of ``size``; None when it lies wholly
    outside the picture."""
    if len(box) != 4:
        raise GradCAMError(f"box {index} must be (x0, y0, x1, y1), got {len(box)} numbers")
    x0, y0, x1, y1 = (float(value) for value in box)
    if not all(math.isfinite(value) for value in (x0, y0, x1, y1)):
        raise GradCAMError(f"box {index} must hold finite numbers, got {tuple(box)}")
    if x1 < x0 or y1 < y0:
        raise GradCAMError(f"box {index} must have x0 <= x1 and y0 <= y1, got {tuple(box)}")
    width, height = size
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        return None
    return (
        max(0, round(x0)),
        max(0, round(y0)),
        min(width - 1, round(x1)),
        min(height - 1, round(y1)),
    )


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    corner: tuple[int, int],
    caption: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    color: tuple[int, int, int],
    size: tuple[int, int],
) -> None:
    """``caption`` on a label filled with ``color`` whose bottom-left corner sits at the box's top-left
    ``corner``; inside the box when there is no room above it, and shifted left to stay in the picture."""
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    pad = max(1, (bottom - top) // 5)
    label_width, label_height = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0, min(corner[0], size[0] - label_width))
    y = corner[1] - label_height if corner[1] >= label_height else corner[1]
    draw.rectangle((x, y, x + label_width - 1, y + label_height - 1), fill=color)
    draw.text((x + pad - left, y + pad - top), caption, fill=_ink_on(color), font=font)


def draw_boxes(
    picture: Image.Image,
    boxes: Sequence[Sequence[float]],
    captions: Sequence[str],
    color: tuple[int, int, int] = (255, 255, 0),
    width: int | None = None,
) -> Image.Image:
    """An RGB copy of ``picture`` with each (x0, y0, x1, y1) box (pixels of that picture, corners
    included) outlined in ``color`` and its caption (e.g. "person 0.91") written on a label of that
    colour just above the box, or just inside it when the box touches the top edge.

    The outline lies inside the box, ``width`` pixels thick (default max(2, round(min(w, h) / 200)));
    boxes are clipped to the picture and those wholly outside it are left out. An empty caption draws
    no label. Pillow's default font is used, scaled to the picture.
    """
    if len(captions) != len(boxes):
        raise GradCAMError(f"captions must be one per box: got {len(captions)} for {len(boxes)} boxes")
    canvas = picture.convert("RGB")  # a copy, even of an RGB picture
    size = canvas.size
    line = max(2, round(min(size) / 200)) if width is None else width
    if line < 1:
        raise GradCAMError(f"box line width must be at least 1 pixel, got {line}")
    font = _font(max(10, min(32, round(min(size) / 25))))
    draw = ImageDraw.Draw(canvas)
    for index, (box, caption) in enumerate(zip(boxes, captions, strict=True)):
        corners = _box_pixels(box, index, size)
        if corners is None:
            continue
        draw.rectangle(corners, outline=color, width=line)
        if caption:
            _draw_caption(draw, (corners[0], corners[1]), caption, font, color, size)
    return canvas


def draw_mask_outline(
    picture: Image.Image,
    mask: np.ndarray | torch.Tensor,
    color: tuple[int, int, int] = (0, 255, 255),
    width: int = 2,
) -> Image.Image:
    """An RGB copy of ``picture`` with the boundary of a boolean (H, W) ``mask`` drawn in ``color``,
    ``width`` pixels thick (half inside, half outside the mask; an odd width puts the extra pixel
    inside). The picture's edge closes a mask that touches it. An empty mask gives an unchanged copy."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise GradCAMError(f"mask must be boolean (threshold it first), got dtype {mask.dtype}")
    expected = (picture.height, picture.width)
    if mask.shape != expected:
        raise GradCAMError(f"mask shape {mask.shape} must match the picture's (H, W) {expected}")
    if width < 1:
        raise GradCAMError(f"mask outline width must be at least 1 pixel, got {width}")
    canvas = picture.convert("RGB")  # a copy, even of an RGB picture
    if not mask.any():
        return canvas
    # Padded with background so that the picture's edge closes the mask; "inner" marks one pixel inside
    # the mask, "thick" one on each side: an odd or even width once dilated by whole rings.
    padded = np.pad(mask, 1)
    edge = find_boundaries(padded, mode="inner" if width % 2 else "thick")
    if width > 2:
        edge = ndimage.binary_dilation(edge, np.ones((3, 3), dtype=bool), iterations=(width - 1) // 2)
    pixels = np.array(canvas)
    pixels[edge[1:-1, 1:-1]] = color
    return Image.fromarray(pixels, mode="RGB")


def frame_strip(frames: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Frames of one size laid out left to right in rows of ``columns`` (default: all in one row), ``gap``
    white pixels between them and no margin: frame k sits at ((k % columns) (w + gap),
    (k // columns) (h + gap))."""
    if not frames:
        raise GradCAMError("frame strip needs at least one frame, got none")
    if columns is not None and columns < 1:
        raise GradCAMError(f"frame strip columns must be at least 1, got {columns}")
    if gap < 0:
        raise GradCAMError(f"frame strip gap must be 0 or more pixels, got {gap}")
    size = frames[0].size
    for index, frame in enumerate(frames):
        if frame.size != size:
            raise GradCAMError(f"frames must be of one size: frame {index} is {frame.size}, frame 0 {size}")
    count = len(frames) if columns is None else min(columns, len(frames))
    rows = -(-len(frames) // count)
    width, height = size
    canvas = Image.new("RGB", (count * width + (count - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, frame in enumerate(frames):
        row, column = divmod(index, count)
        canvas.paste(frame.convert("RGB"), (column * (width + gap), row * (height + gap)))
    return canvas


# ------------------------------------------------------------ concepts (Deep Feature Factorization)

#: The most concepts an overlay tells apart: matplotlib's tab20 has 20 distinct colours.
MAX_CONCEPTS = 20


def concept_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct RGB colours, one per concept: matplotlib's tab10 for up to 10, tab20 above."""
    if not 1 <= count <= MAX_CONCEPTS:
        raise GradCAMError(f"concept colours: expected 1 to {MAX_CONCEPTS} concepts, got {count}")
    table = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    return [tuple(int(round(255 * channel)) for channel in table[index][:3]) for index in range(count)]  # type: ignore[misc]


def concept_overlay(
    image: Image.Image, strengths: torch.Tensor | np.ndarray, alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """Colour each pixel of ``image`` by its strongest concept, weighted by that concept's strength.

    ``strengths`` (C, h, w) holds values in [0, 1] (resized bilinearly to the image when the sizes
    differ); with s = max_c strengths_c at a pixel and c* the concept reaching it, the pixel becomes
    (1 - alpha s) * image + alpha s * colour(c*), colours from :func:`concept_colors`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise GradCAMError(f"alpha must be between 0 and 1, got {alpha}")
    if isinstance(strengths, torch.Tensor):
        strengths = strengths.detach().to(device="cpu", dtype=torch.float32).numpy()
    array = np.asarray(strengths, dtype=np.float32)
    if array.ndim != 3:
        raise GradCAMError(f"concept maps must be 3-D (C,H,W), got shape {array.shape}")
    palette = np.asarray(concept_colors(array.shape[0]), dtype=np.float32)
    base = image.convert("RGB")
    fitted = np.stack([_fit(concept, base.size) for concept in array])
    strongest, strength = fitted.argmax(axis=0), fitted.max(axis=0)[..., None] * alpha
    pixels = (1.0 - strength) * np.asarray(base, dtype=np.float32) + strength * palette[strongest]
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), mode="RGB")


def concept_legend(captions: Sequence[str]) -> Image.Image:
    """One row per concept: its colour (:func:`concept_colors`) as a swatch and its caption (e.g. its
    top classes), black on white, Pillow's default font."""
    colors = concept_colors(len(captions))
    font = _font(14)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row = draw.textbbox((0, 0), "Ag", font=font)[3] + 8
    width = max(draw.textbbox((0, 0), caption, font=font)[2] for caption in captions) + 2 * row + 8
    canvas = Image.new("RGB", (width, row * len(captions) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (caption, color) in enumerate(zip(captions, colors, strict=True)):
        top = 2 + index * row
        draw.rectangle((4, top + 2, 4 + row - 4, top + row - 2), fill=color)
        draw.text((row + 8, top + 4), caption, fill=(0, 0, 0), font=font)
    return canvas
