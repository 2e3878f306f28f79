"""Composed test scenes: a sample photo's object pasted at a random off-centre place on a plain texture,
with its box known exactly. Used by the evaluation tests and benchmarks/evaluate_scenes.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# file, the object's crop in it (x0, y0, x1, y1), its ImageNet class
OBJECTS = {
    "cat": ("cat.png", (0, 0, 451, 300), "Egyptian cat"),
    "coffee": ("coffee.png", (70, 15, 485, 392), "espresso"),
}
#: Boxes keep at least this many pixels between themselves and the scene's centre, so that a scene
#: separates a method that finds the object from the centre prior (which points at the middle).
CENTRE_CLEARANCE = 24
GRAIN = 15.0


def texture(rng: np.random.Generator, size: int) -> Image.Image:
    """A light, smoothly varying colour texture with a little grain: no object of its own."""
    base = rng.uniform(150, 220, 3)
    coarse = rng.normal(0, 1, (size // 32, size // 32, 3))
    smooth = Image.fromarray(np.uint8(np.clip(128 + 40 * coarse, 0, 255))).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, GRAIN, (size, size, 3))
    return Image.fromarray(np.uint8(np.clip(base + 0.5 * (np.asarray(smooth, float) - 128) + grain, 0, 255)))


def _clear_of_centre(box: tuple[int, int, int, int], size: int) -> bool:
    centre = size / 2
    dx = max(box[0] - centre, 0, centre - box[2])
    dy = max(box[1] - centre, 0, centre - box[3])
    return (dx * dx + dy * dy) ** 0.5 > CENTRE_CLEARANCE


def compose_scenes(folder: Path, count: int, *, size: int = 448, seed: int = 0) -> Path:
    """Write ``count`` scenes (cat and coffee alternately) and their boxes as ``folder/boxes.json``
    (the JSON annotation format of ``gradcam evaluate``); returns the annotation file's path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for index in range(count):
        kind = "cat" if index % 2 == 0 else "coffee"
        file, crop, label = OBJECTS[kind]
        with Image.open(EXAMPLES / file) as photo:
            thing = photo.convert("RGB").crop(crop)
        width = int(size * rng.uniform(0.38, 0.45))
        height = round(thing.height * width / thing.width)
        thing = thing.resize((width, height), Image.LANCZOS)
        while True:
            x0 = int(rng.integers(0, size - width + 1))
            y0 = int(rng.integers(0, size - height + 1))
            box = (x0, y0, x0 + width, y0 + height)
            if _clear_of_centre(box, size):
                break
        scene = texture(rng, size)
        scene.paste(thing, (x0, y0))
        name = f"scene{index:02d}_{kind}.png"
        scene.save(folder / name)
        boxes[name] = [{"label": label, "box": list(box)}]
    annotations = folder.parent / f"{folder.name}-boxes.json"
    annotations.write_text(json.dumps(boxes, indent=1))
    return annotations
