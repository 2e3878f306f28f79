"""The image folders a service offers for studies, chosen by name from the listing of its image root.

No client string becomes a path: a folder is one of the names :func:`folders` lists (the root's visible
subfolders, and "." for the root itself when it holds images), an annotations file one of the JSON files
at the top of that folder.
"""

from __future__ import annotations

from pathlib import Path

from gradcam.io import image_extensions
from gradcam.study.store import NotFound


def folders(root: Path | None) -> dict[str, Path]:
    """The folders a study may use, by name (sorted); NotFound when the service has no image root."""
    if root is None:
        raise NotFound("this server has no study image folder; start it with --study-images DIR")
    found: dict[str, Path] = {}
    children = sorted(root.iterdir()) if root.is_dir() else []
    if any(p.is_file() and p.suffix.lower() in image_extensions() for p in children):
        found["."] = root
    for child in children:
        if child.is_dir() and not child.name.startswith("."):
            found[child.name] = child
    return found


def folder(root: Path | None, name: str) -> Path:
    """The folder listed as ``name``; NotFound naming the choices otherwise."""
    listed = folders(root)
    if name not in listed:
        raise NotFound(f"folder '{name}' not found; choose from {', '.join(listed) or 'none'}")
    return listed[name]


def annotation_files(path: Path) -> dict[str, Path]:
    """The JSON files at the top of a folder, by name."""
    return {
        p.name: p
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix.lower() == ".json" and not p.name.startswith(".")
    }


def annotation_file(path: Path, name: str, folder_name: str) -> Path:
    """The annotations file ``name`` of the folder ``folder_name`` (at ``path``); NotFound otherwise."""
    files = annotation_files(path)
    if name not in files:
        choices = ", ".join(files) or "none"
        raise NotFound(f"annotations '{name}' not found in folder '{folder_name}'; choose from {choices}")
    return files[name]
