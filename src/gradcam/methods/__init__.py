"""Explanation methods, one small module per family, and a registry by CLI name."""

from __future__ import annotations

from gradcam.errors import GradCAMError
from gradcam.methods.base import CAM
from gradcam.methods.gradient import GradCAM
from gradcam.methods.guided import GuidedBackprop, GuidedGradCAM

_REGISTRY: dict[str, type[CAM]] = {"gradcam": GradCAM}


def names() -> list[str]:
    """CLI names of the available methods."""
    return list(_REGISTRY)


def get(name: str) -> type[CAM]:
    """The method class registered under ``name`` (e.g. "gradcam")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GradCAMError(f"method '{name}' not found; available: {', '.join(_REGISTRY)}") from None


__all__ = ["CAM", "GradCAM", "GuidedBackprop", "GuidedGradCAM", "get", "names"]
