"""Writing one image's files: overlay and panel PNGs, raw map (.npy, or into .npz shards), guided
pictures, each written atomically."""

from __future__ import annotations

import io as _io
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from gradcam import viz
from gradcam.files import atomic_write_bytes, save_npy
from gradcam.metrics.localization import boxes_from_map
from gradcam.outputs import slug

if TYPE_CHECKING:
    from gradcam.batch.core import Job
    from gradcam.batch.dataset import Sample
    from gradcam.explanation import Explanation
    from gradcam.pipeline import Result

MAP_FORMATS = ("npy", "npz")
#: Maps per .npz shard with ``--maps npz``.
SHARD_SIZE = 1024


def output_stem(
    key: str,
    target: int,
    label: str,
    method: str,
    counterfactual: bool = False,
    detection: int | None = None,
) -> str:
    """``sub/cat.jpg`` -> ``sub/cat.jpg_285-egyptian-cat`` (plus the method when not Grad-CAM, and
    ``_counterfactual``): the image's full name keeps ``cat.jpg`` and ``cat.png`` apart. A detection's
    stem leads with its index, as an image may hold several of one label: ``street.jpg_det0_1-person``."""
    tag = "" if method == "gradcam" else f"_{slug(method.replace('+', 'p'))}"  # gradcam++ -> gradcampp
    lead = "" if detection is None else f"det{detection}_"
    return f"{key}_{lead}{target}-{slug(label)}{tag}{'_counterfactual' if counterfactual else ''}"


def write_target(
    job: Job,
    sample: Sample,
    key: str,
    result: Result,
    n: int,
    row: int,
    shards: ShardWriter | None,
) -> dict:
    """Write the files of class n of image ``row``: overlay, raw map (.npy or into a shard), panel when
    the job keeps panels, Guided Backprop and Guided Grad-CAM pictures when the result has them.

    The map is upsampled once, straight to the picture it is drawn on, and colormapped once; the overlay
    and the panel are made from that one heatmap. Returns the manifest fields of the files: ``files``
    (paths relative to the output folder), the map's ``peak`` and Grad-CAM ``box`` in the full frame's
    pixels, and the frame's ``size``.
    """
    labels, out = job.loaded.labels, job.out
    target = result.wanted[row][n]
    name = labels[target] if 0 <= target < len(labels) else "target"
    detection = n if result.boxes is not None else None
    stem = output_stem(key, target, name, result.method, job.explainer.counterfactual, detection)
    if sample.picture.ndim == 4:  # a clip's frames
        return _write_clip(job, sample, stem, result, n, row)
    picture = Image.fromarray(sample.picture)
    files: dict[str, str] = {}
    drawn = None
    if result.explanation is not None:
        explanation = result.explanation
        drawn = explanation.map_at(n, row, (picture.height, picture.width))
        heat = viz.heatmap(drawn)
        overlay = _marked(Image.blend(picture, heat, viz.OVERLAY_ALPHA), result, n, row, sample, name)
        pictures = {"overlay": overlay}
        if job.panels:
            title = f"{Path(key).name}: {name} ({_value(result, n, row)}) {_kind(job)}"
            pictures["panel"] = viz.compose_panel(picture, heat, overlay, title)
        for kind, image in pictures.items():
            files[kind] = _save(out, f"{stem}_{kind}.png", image)
        raw = _own_cells(explanation, n, row)
        shard_key = f"{key}#{target}" if detection is None else f"{key}#det{detection}"
        files["map"] = write_map(out, stem, raw) if shards is None else shards.add(shard_key, raw)
    for method in result.pixel_methods():  # Guided Backprop and Guided Grad-CAM when asked for
        picture_of = viz.guided_image(result.pictures(method)[n, row])
        files[method] = _save(out, f"{stem}_{method}.png", picture_of)
    return {**_locate(drawn, sample.frame_size), "files": files}


def _own_cells(explanation: Explanation, n: int, row: int) -> torch.Tensor:
    """The raw map of class n of image ``row``; for a detector's image, only the grid cells that cover
    the image on the padded canvas (ceil(h * h_b / H_c) x ceil(w * w_b / W_c)), so that the saved map does
    not depend on which images shared its batch."""
    raw = explanation.raw[n, row]
    placement = explanation.placement
    if placement is None:
        return raw
    (height, width), (placed_h, placed_w) = placement.canvas, placement.placed[row]
    rows = math.ceil(raw.shape[-2] * placed_h / height)
    cols = math.ceil(raw.shape[-1] * placed_w / width)
    return raw[..., :rows, :cols]


def _value(result: Result, n: int, row: int) -> str:
    """A row's probability as a percentage, or its score when the target has no probability."""
    probability = float(result.probs[n, row])
    return f"score {float(result.scores[n, row]):.3g}" if math.isnan(probability) else f"{probability:.1%}"


def _marked(overlay: Image.Image, result: Result, n: int, row: int, sample: Sample, name: str) -> Image.Image:
    """The overlay with the task's marks: a detection's box, label and score; a segmented class's
    predicted mask outline."""
    if result.boxes is not None and sample.frame_size is not None:
        scale = overlay.width / sample.frame_size[0]
        box = [float(v) * scale for v in result.boxes[n, row]]
        return viz.draw_boxes(overlay, [box], [f"{name} {float(result.scores[n, row]):.2f}"])
    if result.masks is not None:
        mask = Image.fromarray(result.masks[n, row].numpy()).resize(overlay.size, Image.Resampling.NEAREST)
        return viz.draw_mask_outline(overlay, np.asarray(mask, dtype=bool))
    return overlay


def _write_clip(job: Job, sample: Sample, stem: str, result: Result, n: int, row: int) -> dict:
    """A clip's files: the animated overlay (GIF), the strip of its overlaid frames and the raw
    (t, h, w) map; its ``peak`` is the frame and pixel of the map's maximum."""
    from gradcam import video

    out, files = job.out, {}
    frames = [Image.fromarray(frame) for frame in sample.picture]
    if result.explanation is None:
        return {"files": files}
    drawn = result.explanation.map_at(n, row, (len(frames), frames[0].height, frames[0].width))
    overlays = [viz.overlay(frame, heat) for frame, heat in zip(frames, drawn, strict=True)]
    video.save_animation(overlays, out / f"{stem}_overlay.gif")
    files["overlay"] = f"{stem}_overlay.gif"
    files["strip"] = _save(out, f"{stem}_strip.png", viz.frame_strip(overlays, columns=min(8, len(overlays))))
    files["map"] = write_map(out, stem, result.explanation.raw[n, row])
    width, height = sample.frame_size or (frames[0].width, frames[0].height)
    t, y, x = (int(v) for v in np.unravel_index(int(drawn.argmax()), tuple(drawn.shape)))
    sx, sy = width / frames[0].width, height / frames[0].height
    peak = {"frame": t, "x": round((x + 0.5) * sx, 1), "y": round((y + 0.5) * sy, 1)}
    return {"peak": peak, "size": [width, height], "frames": len(frames), "files": files}


def _kind(job: Job) -> str:
    method = job.explainer.method
    return f"{method} counterfactual" if job.explainer.counterfactual else method


def _save(out: Path, relative: str, picture: Image.Image) -> str:
    viz.save_png(picture, out / relative)
    return relative


def _locate(drawn: torch.Tensor | None, frame_size: tuple[int, int]) -> dict:
    """The drawn map's peak (pixel centre) and box, in the full frame's pixels, and the frame's size."""
    width, height = frame_size
    if drawn is None:
        return {"size": [width, height]}
    rows, cols = drawn.shape
    sx, sy = width / cols, height / rows
    peak = int(drawn.flatten().argmax())
    x0, y0, x1, y1 = boxes_from_map(drawn).tolist()
    return {
        "peak": {"x": round((peak % cols + 0.5) * sx, 1), "y": round((peak // cols + 0.5) * sy, 1)},
        "box": [round(x0 * sx, 1), round(y0 * sy, 1), round(x1 * sx, 1), round(y1 * sy, 1)],
        "size": [width, height],
    }


def write_map(out: Path, stem: str, raw: torch.Tensor) -> str:
    """The raw map at the layer's resolution as ``OUT/{stem}_map.npy``."""
    relative = f"{stem}_map.npy"
    save_npy(raw.numpy().astype(np.float32), out / relative)
    return relative


class ShardWriter:
    """Raw maps gathered into compressed ``OUT/maps/shard-NNNNNN.npz`` files of SHARD_SIZE maps each.

    A shard is written (atomically) when full and at the end; its maps get their manifest lines only
    then, so a crash loses only maps whose lines were never written. Array names are the manifest keys.
    """

    def __init__(self, out: Path, first_shard: int) -> None:
        self.out, self.number = out, first_shard
        self.pending: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()

    def path(self) -> str:
        return f"maps/shard-{self.number:06d}.npz"

    def add(self, name: str, raw: torch.Tensor) -> str:
        with self.lock:
            self.pending[name] = raw.numpy().astype(np.float32)
            return self.path()

    def full(self) -> bool:
        return len(self.pending) >= SHARD_SIZE

    def flush(self) -> None:
        """Write the pending maps as the current shard and start the next one."""
        with self.lock:
            if not self.pending:
                return
            buffer = _io.BytesIO()
            np.savez_compressed(buffer, **self.pending)
            atomic_write_bytes(self.out / self.path(), buffer.getvalue())
            self.pending = {}
            self.number += 1
