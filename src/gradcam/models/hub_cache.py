"""The Hugging Face hub cache, read offline: where it is and which files it holds. Nothing here downloads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    """The hub cache folder as huggingface_hub chooses it, read from the environment now (not at import):
    HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def split_revision(repo: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; no ``@`` -> revision None (the cache's main)."""
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def cached_file(repo: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` that the cache holds for ``repo`` (``org/name[@revision]``), else None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = split_revision(repo)
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(), revision=revision)
        except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
            return None
        if isinstance(found, str):  # else None or the "known not to exist" marker
            return Path(found)
    return None
