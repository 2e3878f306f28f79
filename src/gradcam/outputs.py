"""Writing one explanation to disk: overlay PNG, panel PNG, raw map .npy, all written atomically."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradcam import viz
from gradcam.files import save_npy


def slug(text: str) -> str:
    """A file-name-safe form of a class name: 'Egyptian cat' -> 'egyptian-cat'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "class"


def write_explanation(
    out_dir: Path,
    stem: str,
    picture: Image.Image,
    saliency: torch.Tensor,
    raw: torch.Tensor,
    title: str,
    extra: dict[str, Image.Image] | None = None,
) -> dict[str, str]:
    """Write ``{stem}_overlay.png``, ``{stem}_panel.png`` and ``{stem}_map.npy`` under ``out_dir``.

    ``picture`` is the image the map registers with; ``saliency`` the normalised (H,W) map; ``raw`` the
    un-normalised map at the layer's resolution; ``extra`` more pictures by kind (written as
    ``{stem}_{kind}.png``). Returns the written paths by kind.
    """
    # Everything is rendered before anything is written, so a rendering error leaves no partial set.
    overlay, panel = viz.overlay(picture, saliency), viz.panel(picture, saliency, title)
    files = {
        "overlay": viz.save_png(overlay, out_dir / f"{stem}_overlay.png"),
        "panel": viz.save_png(panel, out_dir / f"{stem}_panel.png"),
        "map": save_npy(raw.numpy().astype(np.float32), out_dir / f"{stem}_map.npy"),
    }
    for kind, picture_ in (extra or {}).items():
        files[kind] = viz.save_png(picture_, out_dir / f"{stem}_{kind}.png")
    return {kind: str(path) for kind, path in files.items()}


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """File-name stems for outputs, distinct even on case-insensitive file systems."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, number = path.stem, 1
        while stem.lower() in used:
            number += 1
            stem = f"{path.stem}-{number}"
        used.add(stem.lower())
        stems.append(stem)
    return stems
