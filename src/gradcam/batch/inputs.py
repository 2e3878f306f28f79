"""Turning command-line inputs (files, folders, globs, @list files) into a sorted list of image paths."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from gradcam.errors import GradCAMError
from gradcam.io import image_extensions

_GLOB_CHARACTERS = set("*?[")


def _expand(spec: str, extensions: set[str], from_list: bool) -> list[Path]:
    if spec.startswith("@") and not from_list:
        listing = Path(spec[1:])
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise GradCAMError(f"list file '{listing}' cannot be read: {error}") from None
        found: list[Path] = []
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                found += _expand(line.strip(), extensions, True)
        return found
    path = Path(spec)
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")
        )
    if _GLOB_CHARACTERS & set(spec) and not path.exists():  # an existing "photo [1].jpg" is a file
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    return [path]  # a single file, even a missing one: it is reported when it fails to load


def collect_images(specs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every image the specs name, in order, without duplicates.

    A spec is a file (kept even when missing or not an image: it is reported when it fails to load), a
    folder (searched recursively for files with an extension Pillow reads; hidden files skipped), a glob
    (``"photos/**/*.jpg"``) or ``@list.txt`` (one spec per line; blank lines and ``#`` comments skipped).
    """
    extensions = image_extensions()
    seen: dict[Path, None] = {}
    for spec in specs:
        for path in _expand(os.fspath(spec), extensions, False):
            seen.setdefault(path, None)
    return list(seen)


def collect_clips(specs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every clip the specs name, in order, without duplicates (the inputs of a video model).

    A spec is a video file (kept even when missing: it is reported when it fails to load), a folder
    of frame images (one clip), a folder holding video files or frame folders (each one clip, searched
    recursively), a glob or ``@list.txt`` as for :func:`collect_images`.
    """
    from gradcam import video

    seen: dict[Path, None] = {}
    for spec in specs:
        text = os.fspath(spec)
        if text.startswith("@") or (_GLOB_CHARACTERS & set(text) and not Path(text).exists()):
            found = _expand(text, set(video.VIDEO_SUFFIXES), False)
        else:
            found = _clips_in(Path(text))
        for path in found:
            seen.setdefault(path, None)
    return list(seen)


def _clips_in(path: Path) -> list[Path]:
    from gradcam import video

    if not path.is_dir() or video.is_video(path):
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if not p.name.startswith(".")
        and ((p.is_file() and p.suffix.lower() in video.VIDEO_SUFFIXES) or (p.is_dir() and video.is_video(p)))
    )


def output_keys(paths: Sequence[Path]) -> list[str]:
    """Each image's path relative to the deepest folder holding them all, in POSIX form: the layout
    mirrored under the output folder (``a/b/cat.jpg`` -> ``OUT/a/b/cat.jpg_...``)."""
    if not paths:
        return []
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [p.relative_to(root).as_posix() for p in absolute]
