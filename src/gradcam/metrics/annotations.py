"""Ground-truth boxes for evaluations: a JSON file, or a folder of PASCAL VOC XML files (ImageNet's).

JSON: ``{"<image file name>": [{"label": <class index or name>, "box": [x0, y0, x1, y1]}, ...], ...}``
with boxes in the image's own pixels, half-open (``x1`` is one past the last column; see
:mod:`gradcam.metrics.localization`).

VOC XML: one file per image with ``<filename>`` and ``<object><name>`` / ``<bndbox>`` entries; VOC
counts pixels from 1 with inclusive ends, so a box is read as (xmin - 1, ymin - 1, xmax, ymax), clamped at
0 (converters that write 0-based corners are common). ImageNet's
files name objects by WordNet id (``n02123045``) and give the file name without its extension; both are
handled: object names resolve through the model's class names or a mapping file, and an image is matched
by its file name or, failing that, by its name without the extension.

A mapping file turns annotation names into the model's classes: JSON ``{"n02123045": 281, ...}`` (an
index or a class name as value), or text lines ``KEY VALUE``; in text, a file with exactly one line per
class maps each key to its line's number (ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca
tinca`` on line 0 is class 0), otherwise each value must be a class index or name.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gradcam.errors import GradCAMError
from gradcam.targets import parse_class


@dataclass(frozen=True)
class Annotation:
    """One annotated object: its class index and its box (x0, y0, x1, y1) in the image's pixels."""

    label: int
    box: tuple[float, float, float, float]


class AnnotationSet:
    """Annotations per image, looked up by file name or by file name without its extension."""

    def __init__(self, by_name: dict[str, list[Annotation]]) -> None:
        self.by_name = by_name
        self._by_stem: dict[str, list[Annotation]] = {}
        for name, objects in by_name.items():
            if not Path(name).suffix:  # ImageNet's XML names the image without its extension
                self._by_stem.setdefault(name, objects)

    def __len__(self) -> int:
        return len(self.by_name)

    def find(self, image: str | os.PathLike[str]) -> list[Annotation] | None:
        """The objects annotated for ``image`` (a path or a file name), or None when it has none: by its
        file name, else (for annotations that name files without an extension) by its stem."""
        path = Path(image)
        found = self.by_name.get(path.name)
        return found if found is not None else self._by_stem.get(path.stem)


def _read_mapping(path: Path, labels: Sequence[str]) -> dict[str, int]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GradCAMError(f"label mapping '{path}' cannot be read: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise GradCAMError(f"label mapping '{path}' is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise GradCAMError(f"label mapping '{path}' must be a JSON object {{name: class}}")
        return {str(key): _class_of(value, labels, f"label mapping '{path}'") for key, value in raw.items()}
    # (line number in the file, key, value) of each non-blank line; keys and values split on whitespace.
    entries = [
        (number, *(line.split(None, 1) + [""])[:2])
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if len(entries) == len(labels):
        # One line per class, in class order (ImageNet's LOC_synset_mapping.txt): the line is the class,
        # whatever its description says ("crane" the bird is not "crane" the machine).
        return {key: index for index, (_, key, _) in enumerate(entries)}
    mapping = {}
    for number, key, value in entries:
        try:
            mapping[key] = _class_of(value.strip(), labels, "")
        except GradCAMError:
            raise GradCAMError(
                f"label mapping '{path}' line {number}: '{value.strip()}' is not a class of this "
                f"model, and the file has {len(entries)} entries, not one per class ({len(labels)})"
            ) from None
    return mapping


def _class_of(value: object, labels: Sequence[str], where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise GradCAMError(f"{where}: a label must be a class index or name, got {value!r}")
    try:
        return parse_class(str(value), labels)
    except GradCAMError as error:
        raise GradCAMError(f"{where}: {error}" if where else str(error)) from None


def _box(values: object, where: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise GradCAMError(f"{where}: a box must be [x0, y0, x1, y1] numbers, got {values!r}") from None
    if not (x1 > x0 and y1 > y0 and min(x0, y0) >= 0):
        raise GradCAMError(f"{where}: box {[x0, y0, x1, y1]} must have x1 > x0 >= 0 and y1 > y0 >= 0")
    return (x0, y0, x1, y1)


class _Resolver:
    def __init__(self, labels: Sequence[str], mapping: dict[str, int]) -> None:
        self.labels, self.mapping = labels, mapping

    def __call__(self, value: object, where: str) -> int:
        if isinstance(value, str) and value in self.mapping:
            return self.mapping[value]
        return _class_of(value, self.labels, where)


def _read_json(path: Path, resolve: _Resolver) -> dict[str, list[Annotation]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise GradCAMError(f"annotations '{path}' cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise GradCAMError(f"annotations '{path}' is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise GradCAMError(f"annotations '{path}' must be a JSON object {{image file name: [objects]}}")
    out = {}
    for name, objects in raw.items():
        where = f"annotations '{path}', image '{name}'"
        if not isinstance(objects, list):
            raise GradCAMError(f'{where}: expected a list of {{"label": ..., "box": [...]}} objects')
        parsed = []
        for entry in objects:
            if not isinstance(entry, dict) or "label" not in entry or "box" not in entry:
                raise GradCAMError(f'{where}: each object needs a "label" and a "box", got {entry!r}')
            parsed.append(Annotation(resolve(entry["label"], where), _box(entry["box"], where)))
        out[str(name)] = parsed
    return out


def _read_voc(path: Path, resolve: _Resolver) -> tuple[str, list[Annotation]]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        raise GradCAMError(f"annotation file '{path}' is not readable VOC XML: {error}") from None
    filename = (root.findtext("filename") or path.stem).strip()
    objects = []
    for number, obj in enumerate(root.iter("object")):
        where = f"annotation file '{path}', object {number + 1}"
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise GradCAMError(f"{where}: needs <name> and <bndbox>")
        corners = [box.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in corners)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise GradCAMError(f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        corner = (max(xmin - 1, 0.0), max(ymin - 1, 0.0), xmax, ymax)
        objects.append(Annotation(resolve(name, where), _box(corner, where)))
    return filename, objects


def load_annotations(
    source: str | os.PathLike[str],
    labels: Sequence[str],
    *,
    mapping: str | os.PathLike[str] | None = None,
) -> AnnotationSet:
    """Read a JSON annotation file or a folder of VOC XML files (module docstring), with every label
    resolved to one of ``labels``' indices. Raises GradCAMError naming the file and the entry at fault."""
    path = Path(source)
    mapped = _read_mapping(Path(mapping), labels) if mapping is not None else {}
    resolve = _Resolver(labels, mapped)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise GradCAMError(f"annotation folder '{path}' holds no .xml files (PASCAL VOC format expected)")
        by_name: dict[str, list[Annotation]] = {}
        for file in files:
            name, objects = _read_voc(file, resolve)
            by_name.setdefault(name, []).extend(objects)
        return AnnotationSet(by_name)
    if not path.is_file():
        raise GradCAMError(f"annotations '{path}' not found; expected a JSON file or a folder of VOC XML")
    return AnnotationSet(_read_json(path, resolve))


def boxes_of(objects: Sequence[Annotation], label: int | None = None) -> torch.Tensor:
    """(M, 4) float64 boxes of the objects of class ``label`` (every object when None)."""
    chosen = [o.box for o in objects if label is None or o.label == label]
    return torch.tensor(chosen, dtype=torch.float64).reshape(-1, 4)
