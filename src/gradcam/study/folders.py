"""The image folders a service offers for studies, chosen by name from the listing of its image root.

No client string becomes a path: a folder is one of the names :func:`folders` lists (the root's visible
subfolders, and "." for the root itself when it holds images), an annotations file one of the JSON files
at the top of that folder.

Nothing outside the root is offered. A subfolder that is a symlink resolving outside the root (or a JSON
file resolving outside its folder) is not listed: listing it would offer whatever it points at, and its
owner sees no folder they did not put there. Asked for by name, it is refused with that reason, so a
study owner who made such a link learns why it is missing. A symlink that stays inside the root is
listed like any folder. The images of a folder are held to the same rule when a study is made
(:func:`gradcam.study.pairs.escapes`: an image resolving outside its folder is skipped, with why).
"""

from __future__ import annotations

from pathlib import Path

from gradcam.io import image_extensions
from gradcam.study.store import NotFound

#: Why a folder or file that resolves outside the image root is not offered.
OUTSIDE = "it is a symlink to outside the study image folder"


def inside(path: Path, base: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies within ``base`` (also resolved)."""
    return path.resolve().is_relative_to(base.resolve())


def _listing(root: Path) -> tuple[dict[str, Path], set[str]]:
    """The folders offered by name, and the names of the visible subfolders refused as outside."""
    children = sorted(root.iterdir()) if root.is_dir() else []
    found: dict[str, Path] = {}
    extensions = image_extensions()
    if any(p.is_file() and p.suffix.lower() in extensions and inside(p, root) for p in children):
        found["."] = root
    refused = set()
    for child in children:
        if child.is_dir() and not child.name.startswith("."):
            if inside(child, root):
                found[child.name] = child
            else:
                refused.add(child.name)
    return found, refused


def folders(root: Path | None) -> dict[str, Path]:
    """The folders a study may use, by name (sorted); NotFound when the service has no image root."""
    if root is None:
        raise NotFound("this server has no study image folder; start it with --study-images DIR")
    return _listing(root)[0]


def folder(root: Path | None, name: str) -> Path:
    """The folder listed as ``name``; NotFound naming the choices (or why it is not offered) otherwise."""
    if root is None:
        raise NotFound("this server has no study image folder; start it with --study-images DIR")
    listed, refused = _listing(root)
    if name in refused:
        raise NotFound(f"folder '{name}' is not offered: {OUTSIDE}")
    if name not in listed:
        raise NotFound(f"folder '{name}' not found; choose from {', '.join(listed) or 'none'}")
    return listed[name]


def _json_files(path: Path) -> list[Path]:
    return [
        p
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix.lower() == ".json" and not p.name.startswith(".")
    ]


def annotation_files(path: Path) -> dict[str, Path]:
    """The JSON files at the top of a folder that resolve inside it, by name."""
    return {p.name: p for p in _json_files(path) if inside(p, path)}


def annotation_file(path: Path, name: str, folder_name: str) -> Path:
    """The annotations file ``name`` of the folder ``folder_name`` (at ``path``); NotFound otherwise."""
    files = annotation_files(path)
    if name not in files:
        if any(p.name == name for p in _json_files(path)):
            raise NotFound(
                f"annotations '{name}' is not offered: it is a symlink to outside folder '{folder_name}'"
            )
        choices = ", ".join(files) or "none"
        raise NotFound(f"annotations '{name}' not found in folder '{folder_name}'; choose from {choices}")
    return files[name]
