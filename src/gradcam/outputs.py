"""Names of output files: class names as file-name slugs, stems distinct on any file system."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a class name: 'Egyptian cat' -> 'egyptian-cat'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "class"


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
