"""Explanation methods, one small module per family, and a registry by CLI name."""

from __future__ import annotations

from gradcam.errors import GradCAMError
from gradcam.methods.attention import AttentionRollout, GenericAttention
from gradcam.methods.base import CAM, MapContext
from gradcam.methods.baseline import RandomCAM
from gradcam.methods.eigen import EigenCAM, EigenGradCAM
from gradcam.methods.gradient import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from gradcam.methods.guided import GuidedBackprop, GuidedGradCAM
from gradcam.methods.score import AblationCAM, ScoreCAM

_REGISTRY: dict[str, type[CAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "randomcam": RandomCAM,
    "rollout": AttentionRollout,
    "chefer": GenericAttention,
}


def names() -> list[str]:
    """CLI names of the available methods."""
    return list(_REGISTRY)


def describe(name: str) -> str:
    """One line saying what a method is: the first line of its docstring."""
    return " ".join((get(name).__doc__ or name).split("\n\n")[0].split())


def get(name: str) -> type[CAM]:
    """The method class registered under ``name`` (e.g. "gradcam")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GradCAMError(f"method '{name}' not found; available: {', '.join(_REGISTRY)}") from None


__all__ = [
    "AblationCAM",
    "AttentionRollout",
    "CAM",
    "EigenCAM",
    "EigenGradCAM",
    "GradCAM",
    "GenericAttention",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "MapContext",
    "RandomCAM",
    "ScoreCAM",
    "XGradCAM",
    "describe",
    "get",
    "names",
]
