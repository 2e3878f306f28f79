"""Writing one image's maps: overlay PNG and raw map (.npy, or into .npz shards), atomically."""

from __future__ import annotations

import io as _io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradcam import viz
from gradcam.files import atomic_write_bytes, save_npy
from gradcam.outputs import slug

MAP_FORMATS = ("npy", "npz")
#: Maps per .npz shard with ``--maps npz``.
SHARD_SIZE = 1024


def output_stem(key: str, target: int, label: str, method: str) -> str:
    """``sub/cat.jpg`` -> ``sub/cat.jpg_285-egyptian-cat`` (plus the method when not Grad-CAM): the
    image's full name keeps ``cat.jpg`` and ``cat.png`` apart."""
    tag = "" if method == "gradcam" else f"_{slug(method.replace('+', 'p'))}"
    return f"{key}_{target}-{slug(label)}{tag}"


def write_overlay(out: Path, stem: str, picture: np.ndarray, saliency: torch.Tensor) -> str:
    """The overlay of a normalised map on ``picture`` (H,W,3 uint8), as ``OUT/{stem}_overlay.png``."""
    relative = f"{stem}_overlay.png"
    viz.save_png(viz.overlay(Image.fromarray(picture), saliency), out / relative)
    return relative


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
