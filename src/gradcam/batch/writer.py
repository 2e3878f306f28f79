"""Writing one image's files: overlay and panel PNGs, raw map (.npy, or into .npz shards), guided
pictures, each written atomically."""

from __future__ import annotations

import io as _io
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
    from gradcam.pipeline import Result

MAP_FORMATS = ("npy", "npz")
#: Maps per .npz shard with ``--maps npz``.
SHARD_SIZE = 1024


def output_stem(key: str, target: int, label: str, method: str, counterfactual: bool = False) -> str:
    """``sub/cat.jpg`` -> ``sub/cat.jpg_285-egyptian-cat`` (plus the method when not Grad-CAM, and
    ``_counterfactual``): the image's full name keeps ``cat.jpg`` and ``cat.png`` apart."""
    tag = "" if method == "gradcam" else f"_{slug(method.replace('+', 'p'))}"  # gradcam++ -> gradcampp
    return f"{key}_{target}-{slug(label)}{tag}{'_counterfactual' if counterfactual else ''}"


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
    stem = output_stem(key, target, labels[target], result.method, job.explainer.counterfactual)
    picture = Image.fromarray(sample.picture)
    files: dict[str, str] = {}
    drawn = None
    if result.explanation is not None:
        explanation = result.explanation
        drawn = explanation.map_at(n, row, (picture.height, picture.width))
        heat = viz.heatmap(drawn)
        overlay = Image.blend(picture, heat, viz.OVERLAY_ALPHA)
        pictures = {"overlay": overlay}
        if job.panels:
            title = f"{Path(key).name}: {labels[target]} ({float(result.probs[n, row]):.1%}) {_kind(job)}"
            pictures["panel"] = viz.compose_panel(picture, heat, overlay, title)
        for kind, image in pictures.items():
            files[kind] = _save(out, f"{stem}_{kind}.png", image)
        raw = explanation.raw[n, row]
        files["map"] = write_map(out, stem, raw) if shards is None else shards.add(f"{key}#{target}", raw)
    for method in result.pixel_methods():  # Guided Backprop and Guided Grad-CAM when asked for
        picture_of = viz.guided_image(result.pictures(method)[n, row])
        files[method] = _save(out, f"{stem}_{method}.png", picture_of)
    return {**_locate(drawn, sample.frame_size), "files": files}


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
