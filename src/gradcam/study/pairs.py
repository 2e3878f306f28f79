"""Choosing a study's images and pre-rendering its pairs (the protocol is in :mod:`gradcam.study`).

An image is kept only when both models put the same class first, and, when annotations are given, that
class is one the image is annotated with: the raters then judge two explanations of one correct decision,
not which model is right. Unreadable images, images missing from the annotations and images the models
disagree on are skipped, each with its reason.

For every kept image and every method, each model's picture for the shared class is rendered once, now:
the guided picture for the pixel methods (guided-backprop and guided-gradcam), the map over the picture
(at most :data:`PICTURE_SIZE` a side) for the CAM methods. Which model is Robot A is randomised per pair with
a seeded generator, balanced within each method (as many pairs with the stronger model on the left as on
the right, give or take one), so a study is reproducible from its seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from gradcam import viz
from gradcam.batch.inputs import collect_images
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.io import load_image
from gradcam.methods import GradCAM, GuidedBackprop, registry
from gradcam.metrics.annotations import load_annotations
from gradcam.models import LoadedModel, model_device
from gradcam.models.pool import ModelPool
from gradcam.study.store import PairRow, Skipped
from gradcam.targets import model_logits, parse_class

#: The kinds of method a study can show: pictures of one class for raters to compare.
STUDY_KINDS = ("cam", "pixel")
#: Largest side of a CAM method's picture (the map over the image as the model sees it).
PICTURE_SIZE = 512
#: Images explained together (one forward per model and method for each chunk).
CHUNK = 8


@dataclass
class Selection:
    """The pairs to store, the images kept (with their shared class) and those skipped."""

    pairs: list[PairRow] = field(default_factory=list)
    kept: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """The images under ``folder`` (recursively; hidden files skipped) as (name relative to the folder,
    path), sorted by name."""
    return sorted((path.relative_to(folder).as_posix(), path) for path in collect_images([folder]))


def nothing_kept(chosen: Selection) -> str:
    """Why a selection kept no image, in one line (the first reasons given)."""
    if not chosen.skipped:
        return "no images found"
    reasons = "; ".join(f"{s.image}: {s.reason}" for s in chosen.skipped[:3])
    more = f" and {len(chosen.skipped) - 3} more" if len(chosen.skipped) > 3 else ""
    return f"no image is classified alike by both models ({reasons}{more})"


def read_annotations(path: Path, labels: Sequence[str]) -> dict[str, frozenset[int]]:
    """Annotated classes per image name.

    Either a JSON object ``{"<image file name>": <class index or name>}``, or any format of
    :func:`gradcam.metrics.annotations.load_annotations` (JSON objects with boxes, a folder of VOC XML),
    whose boxes are ignored: an image's classes are those of its objects.
    """
    if path.is_file() and path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise GradCAMError(f"annotations '{path.name}' cannot be read: {error}") from None
        except json.JSONDecodeError as error:
            raise GradCAMError(f"annotations '{path.name}' is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise GradCAMError(f"annotations '{path.name}' must be a JSON object {{image file name: class}}")
        if all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in raw.values()):
            out = {}
            for name, value in raw.items():
                try:
                    out[str(name)] = frozenset({parse_class(str(value), labels)})
                except GradCAMError as error:
                    raise GradCAMError(f"annotations '{path.name}', image '{name}': {error}") from None
            return out
    annotated = load_annotations(path, labels)
    return {name: frozenset(o.label for o in objects) for name, objects in annotated.by_name.items()}


def annotated_classes(annotations: dict[str, frozenset[int]], name: str) -> frozenset[int] | None:
    """An image's annotated classes, looked up by its name in the folder, its file name, or its file name
    without the extension (VOC XML names images so); None when it has none."""
    path = Path(name)
    for key in (name, path.name, path.stem):
        if key in annotations:
            return annotations[key]
    return None


def assign_sides(count: int, rng: random.Random) -> list[str]:
    """Which robot ("A" or "B") shows the stronger model for each of ``count`` pairs: a random order of
    equally many A and B (one more of a random side when ``count`` is odd)."""
    sides = ["A", "B"] * (count // 2)
    if count % 2:
        sides.append(rng.choice("AB"))
    rng.shuffle(sides)
    return sides


def _frame(loaded: LoadedModel, image: Image.Image) -> Image.Image:
    """The picture a CAM method's map is drawn on: the image as the model sees it, at most
    :data:`PICTURE_SIZE` a side."""
    picture = loaded.preprocess.frame(image).copy()
    picture.thumbnail((PICTURE_SIZE, PICTURE_SIZE), Image.Resampling.BILINEAR)
    return picture


def _top1(pool: ModelPool, loaded: LoadedModel, images: Sequence[Image.Image]) -> list[int]:
    batch = torch.stack([loaded.preprocess(image) for image in images])
    with pool.lock(loaded.name), torch.no_grad():
        logits = model_logits(loaded.module(batch.to(model_device(loaded.module))))
    return logits.argmax(dim=1).tolist()


def _pictures(
    pool: ModelPool, loaded: LoadedModel, method: str, images: Sequence[Image.Image], classes: Sequence[int]
) -> list[bytes]:
    entry = registry.get(method)
    batch = torch.stack([loaded.preprocess(image) for image in images]).to(model_device(loaded.module))
    with pool.lock(loaded.name):
        if entry.kind == "pixel":
            guided = GuidedBackprop(loaded.module)(batch, list(classes))
            if method == "guided-gradcam":
                guided = guided * GradCAM(loaded.module)(batch, list(classes)).maps[:, None]
            shown = [viz.guided_image(gradient) for gradient in guided]
        else:
            maps = entry.build(loaded.module)(batch, list(classes)).maps
            shown = [viz.overlay(_frame(loaded, image), m) for image, m in zip(images, maps, strict=True)]
    return [viz.encode_png(picture) for picture in shown]


def check_models(pool: ModelPool, stronger: str, weaker: str) -> tuple[LoadedModel, LoadedModel]:
    """Both models, loaded; GradCAMError when they are one model, not served, or name classes apart."""
    if stronger == weaker:
        raise GradCAMError(f"stronger and weaker model are both '{stronger}'; a study compares two models")
    strong, weak = pool.get(stronger), pool.get(weaker)
    if list(strong.labels) != list(weak.labels):
        raise GradCAMError(
            f"models '{stronger}' and '{weaker}' have different classes; a study needs one set of classes"
        )
    return strong, weak


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods without repeats, each a registered CAM or pixel method; GradCAMError when none or one
    is not."""
    chosen = list(dict.fromkeys(methods))
    if not chosen:
        raise GradCAMError("methods is empty; name at least one, e.g. guided-backprop,guided-gradcam")
    offered = registry.names(STUDY_KINDS, needs_model=True)
    for method in chosen:
        registry.get(method, offered)
    return chosen


def build_pairs(
    pool: ModelPool,
    stronger: str,
    weaker: str,
    methods: Sequence[str],
    images: Sequence[tuple[str, Path]],
    *,
    seed: int,
    annotations: dict[str, frozenset[int]] | None = None,
    max_images: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Selection:
    """Select the images (module docstring) and render every pair.

    ``images`` are (name, path) as :func:`list_images` gives them. With ``max_images`` the images are
    taken in a random order (from ``seed``) until that many are kept; otherwise all, in name order.
    ``progress(done, total)`` is called after each chunk of images.
    """
    strong, weak = check_models(pool, stronger, weaker)
    methods = check_methods(methods)
    order = list(images)
    if max_images is not None:
        random.Random(seed).shuffle(order)
    selection = Selection()
    rendered: list[tuple[str, int, str, bytes, bytes]] = []  # image, class, method, stronger, weaker
    for start in range(0, len(order), CHUNK):
        if max_images is not None and len(selection.kept) >= max_images:
            break
        chunk = _selectable(order[start : start + CHUNK], annotations, selection.skipped)
        if chunk:
            names, pictures = zip(*chunk, strict=True)
            kept = _agreeing(pool, strong, weak, names, pictures, annotations, selection.skipped)
            if max_images is not None:
                kept = kept[: max_images - len(selection.kept)]
            if kept:
                rendered += _render_chunk(
                    pool, strong, weak, methods, [(names[i], pictures[i], c) for i, c in kept]
                )
                selection.kept += [(names[i], c) for i, c in kept]
        if progress is not None:
            progress(min(start + CHUNK, len(order)), len(order))
    rng = random.Random(seed)
    sides = {method: iter(assign_sides(len(selection.kept), rng)) for method in methods}
    for image, index, method, strong_png, weak_png in rendered:
        side = next(sides[method])
        a, b = (strong_png, weak_png) if side == "A" else (weak_png, strong_png)
        selection.pairs.append(PairRow(image, index, strong.labels[index], method, side, a, b))
    return selection


def _selectable(
    chunk: Sequence[tuple[str, Path]], annotations: dict[str, frozenset[int]] | None, skipped: list[Skipped]
) -> list[tuple[str, Image.Image]]:
    out = []
    for name, path in chunk:
        if annotations is not None and annotated_classes(annotations, name) is None:
            skipped.append(Skipped(name, "not in the annotations"))
            continue
        try:
            out.append((name, load_image(path)))
        except ImageLoadError as error:
            skipped.append(Skipped(name, f"unreadable: {str(error).removeprefix(f'{path}: ')}"))
    return out


def _agreeing(
    pool: ModelPool,
    strong: LoadedModel,
    weak: LoadedModel,
    names: Sequence[str],
    pictures: Sequence[Image.Image],
    annotations: dict[str, frozenset[int]] | None,
    skipped: list[Skipped],
) -> list[tuple[int, int]]:
    """(position in the chunk, shared class) of the images both models classify alike (and right)."""
    labels = strong.labels
    kept = []
    for i, (a, b) in enumerate(zip(_top1(pool, strong, pictures), _top1(pool, weak, pictures), strict=True)):
        if a != b:
            skipped.append(Skipped(names[i], f"the models disagree: '{labels[a]}' and '{labels[b]}'"))
            continue
        wanted = annotated_classes(annotations, names[i]) if annotations is not None else None
        if wanted is not None and a not in wanted:
            shown = ", ".join(f"'{labels[c]}'" for c in sorted(wanted))
            skipped.append(Skipped(names[i], f"both models say '{labels[a]}', annotated {shown}"))
            continue
        kept.append((i, a))
    return kept


def _render_chunk(
    pool: ModelPool,
    strong: LoadedModel,
    weak: LoadedModel,
    methods: Sequence[str],
    chunk: Sequence[tuple[str, Image.Image, int]],
) -> list[tuple[str, int, str, bytes, bytes]]:
    names, pictures, classes = zip(*chunk, strict=True)
    out = {}
    for method in methods:
        strong_png = _pictures(pool, strong, method, pictures, classes)
        weak_png = _pictures(pool, weak, method, pictures, classes)
        out[method] = list(zip(strong_png, weak_png, strict=True))
    return [
        (name, index, method, *out[method][i])
        for i, (name, index) in enumerate(zip(names, classes, strict=True))
        for method in methods
    ]
