"""Choosing a study's images and pre-rendering its pairs (the protocol is in :mod:`gradcam.study`).

An image is kept only when both models put the same class first, and, when annotations are given, that
class is one the image is annotated with: the raters then judge two explanations of one correct decision,
not which model is right. Unreadable images, images missing from the annotations and images the models
disagree on are skipped, each with its reason. So is an image that resolves outside its folder (a
symlink to a file elsewhere, :func:`escapes`): a study shows only what its folder holds, and a link
must not carry a file from elsewhere on the server into the raters' pictures. A symlink that stays in
the folder is followed; symlinked subfolders are not walked, and one leading outside is reported in the
same way (:func:`list_images`).

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
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from gradcam import viz
from gradcam.batch.inputs import collect_images
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.explanation import normalise, upsample
from gradcam.io import UPLOAD_FORMATS, load_image
from gradcam.methods import registry
from gradcam.metrics.annotations import load_annotations
from gradcam.models import LoadedModel, model_device
from gradcam.models.pool import ModelPool
from gradcam.pipeline import Explainer, Result
from gradcam.study.folders import inside
from gradcam.study.store import PairRow, Skipped
from gradcam.targets import parse_class

#: The kinds of method a study can show: pictures of one class for raters to compare.
STUDY_KINDS = ("cam", "pixel")
#: Largest side of a CAM method's picture (the map over the image as the model sees it).
PICTURE_SIZE = 512
#: Images explained together (one explain step per model for each chunk).
CHUNK = 8
#: Why an image that resolves outside its folder is skipped.
ESCAPES = "not used: it is a symlink to outside the study folder"


@dataclass
class Selection:
    """The pairs to store, the images kept (with their shared class) and those skipped."""

    pairs: list[PairRow] = field(default_factory=list)
    kept: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """The images under ``folder`` (recursively; hidden files skipped) as (name relative to the folder,
    path), sorted by name. Symlinked files are listed as they are, and so is a symlinked subfolder that
    leads outside the folder (named with a trailing "/"; symlinked subfolders are never walked):
    :func:`build_pairs` skips every entry that resolves outside the folder (:func:`escapes`) and says so,
    so that a study owner learns why those images are missing."""
    images = [(path.relative_to(folder).as_posix(), path) for path in collect_images([folder])]
    links = [
        (path.relative_to(folder).as_posix() + "/", path)
        for path in folder.rglob("*")
        if path.is_symlink() and path.is_dir() and not path.name.startswith(".") and not inside(path, folder)
    ]
    return sorted(images + links)


def escapes(name: str, path: Path) -> bool:
    """Whether the image at ``path``, named ``name`` relative to its folder (as :func:`list_images` names
    it), resolves outside that folder. When ``path`` does not end in ``name``, its folder is its parent."""
    parts = PurePosixPath(name).parts
    ends_in_name = 0 < len(parts) <= len(path.parents) and path.parts[-len(parts) :] == parts
    return not inside(path, path.parents[len(parts) - 1] if ends_in_name else path.parent)


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


class _Renderer:
    """One model's side of a study's pictures, one explain step (:class:`gradcam.pipeline.Explainer`)
    per chunk of images: :meth:`look` gives each image's top-1 class (for the agreement check), the maps
    of the main CAM method (Grad-CAM when it or Guided Grad-CAM is shown) and, when a pixel method is
    shown, the guided gradients, all from one forward/backward and one guided forward; :meth:`pictures`
    draws them. Another CAM method explains the kept images once more. The explainers are kept for the
    whole study (each finds its automatic layer once)."""

    def __init__(self, pool: ModelPool, loaded: LoadedModel, methods: Sequence[str]) -> None:
        self.pool, self.loaded = pool, loaded
        kinds = {method: registry.get(method).kind for method in methods}
        cams = [method for method in methods if kinds[method] == "cam"]
        wants_gradcam = not cams or "gradcam" in methods or "guided-gradcam" in methods
        self.main = "gradcam" if wants_gradcam else cams[0]
        self.guided = "pixel" in kinds.values()
        self._explainers: dict[str, Explainer] = {}
        self._frames: list[Image.Image] = []
        self._batch: torch.Tensor | None = None
        self._result: Result | None = None

    def _explain(self, method: str, batch: torch.Tensor, targets: list[int] | None = None) -> Result:
        if method not in self._explainers:
            guided = self.guided and method == self.main
            self._explainers[method] = Explainer(self.loaded.module, method, guided=guided)
        with self.pool.lock(self.loaded.name):
            return self._explainers[method].explain(batch, targets)

    def look(self, images: Sequence[Image.Image]) -> list[int]:
        """Explain a chunk of images; each one's top-1 class."""
        device = model_device(self.loaded.module)
        prepared = [self.loaded.preprocess.prepare(image) for image in images]  # resized and cropped once
        # The pictures CAM maps are drawn on: each frame (a new image of our own) at most PICTURE_SIZE.
        self._frames = [viz.shrink(frame, PICTURE_SIZE) for _, frame in prepared]
        self._batch = torch.stack([tensor for tensor, _ in prepared]).to(device)
        self._result = self._explain(self.main, self._batch)
        return self._result.ids[0].tolist()

    def pictures(self, method: str, kept: Sequence[int], classes: Sequence[int]) -> list[bytes]:
        """PNGs of ``method``'s picture of the chunk's images at positions ``kept``, each for its class
        in ``classes`` (their top-1, which :meth:`look` explained)."""
        assert self._result is not None and self._batch is not None
        rows = list(kept)
        if registry.get(method).kind == "pixel":
            gradients = self._result.guided_gradcam() if method == "guided-gradcam" else self._result.guided
            assert gradients is not None
            shown = [viz.guided_image(gradient) for gradient in gradients[0, rows]]
        else:
            if method == self.main:
                raws = self._result.explanation.raw[0, rows]  # type: ignore[union-attr]
            else:
                raws = self._explain(method, self._batch[rows], list(classes)).explanation.raw[0]  # type: ignore[union-attr]
            shown = [_overlay(self._frames[i], raw) for i, raw in zip(rows, raws, strict=True)]
        return [viz.encode_png(picture) for picture in shown]


def _overlay(frame: Image.Image, raw: torch.Tensor) -> Image.Image:
    """The map over its frame: upsampled once to the frame's size, colormapped once, blended."""
    return viz.overlay(frame, normalise(upsample(raw, (frame.height, frame.width))))


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
    renderers = (_Renderer(pool, strong, methods), _Renderer(pool, weak, methods))
    selection = Selection()
    rendered: list[tuple[str, int, str, bytes, bytes]] = []  # image, class, method, stronger, weaker
    for start in range(0, len(order), CHUNK):
        if max_images is not None and len(selection.kept) >= max_images:
            break
        chunk = _selectable(order[start : start + CHUNK], annotations, selection.skipped)
        if chunk:
            names, pictures = zip(*chunk, strict=True)
            tops = [renderer.look(pictures) for renderer in renderers]
            kept = _agreeing(strong.labels, names, *tops, annotations, selection.skipped)
            if max_images is not None:
                kept = kept[: max_images - len(selection.kept)]
            if kept:
                rendered += _render_chunk(renderers, methods, names, kept)
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
        if escapes(name, path):
            skipped.append(Skipped(name, ESCAPES))
            continue
        if annotations is not None and annotated_classes(annotations, name) is None:
            skipped.append(Skipped(name, "not in the annotations"))
            continue
        try:
            out.append((name, load_image(path, formats=UPLOAD_FORMATS)))  # the service's formats
        except ImageLoadError as error:
            skipped.append(Skipped(name, f"unreadable: {str(error).removeprefix(f'{path}: ')}"))
    return out


def _agreeing(
    labels: Sequence[str],
    names: Sequence[str],
    strong_top: Sequence[int],
    weak_top: Sequence[int],
    annotations: dict[str, frozenset[int]] | None,
    skipped: list[Skipped],
) -> list[tuple[int, int]]:
    """(position in the chunk, shared class) of the images both models classify alike (and right)."""
    kept = []
    for i, (a, b) in enumerate(zip(strong_top, weak_top, strict=True)):
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
    renderers: Sequence[_Renderer],
    methods: Sequence[str],
    names: Sequence[str],
    kept: Sequence[tuple[int, int]],
) -> list[tuple[str, int, str, bytes, bytes]]:
    """(image, class, method, stronger PNG, weaker PNG) of the kept images of a chunk, each method."""
    positions, classes = [i for i, _ in kept], [c for _, c in kept]
    out = {
        method: list(zip(*(r.pictures(method, positions, classes) for r in renderers), strict=True))
        for method in methods
    }
    return [(names[i], c, method, *out[method][j]) for j, (i, c) in enumerate(kept) for method in methods]
