"""Explanation methods, one small module per family; :mod:`gradcam.methods.registry` lists them all."""

from __future__ import annotations

from gradcam.methods import registry
from gradcam.methods.attention import AttentionRollout, GenericAttention
from gradcam.methods.base import CAM, MapContext
from gradcam.methods.baseline import RandomCAM
from gradcam.methods.classic import ClassActivationMap
from gradcam.methods.eigen import EigenCAM, EigenGradCAM, KernelPCACAM
from gradcam.methods.factorization import Concepts, DeepFeatureFactorization
from gradcam.methods.fullgrad import FullGrad
from gradcam.methods.gradient import (
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    XGradCAM,
)
from gradcam.methods.guided import GuidedBackprop, GuidedGradCAM
from gradcam.methods.legrad import LeGrad
from gradcam.methods.noisy import ISCAM, SSCAM, SmoothGradCAMpp
from gradcam.methods.score import AblationCAM, ScoreCAM


def names() -> list[str]:
    """Names of the methods whose call returns an :class:`~gradcam.Explanation` (CAM, attention and the
    random CAM); :func:`gradcam.methods.registry.names` lists every method."""
    return [entry.name for entry in registry.entries() if entry.is_cam]


def describe(name: str) -> str:
    """One line saying what a method is, with its paper (from the registry)."""
    return registry.describe(name)


def get(name: str) -> type[CAM]:
    """The CAM class registered under ``name`` (e.g. "gradcam")."""
    entry = registry.get(name, names())
    return entry.build  # type: ignore[return-value]


__all__ = [
    "AblationCAM",
    "AttentionRollout",
    "CAM",
    "ClassActivationMap",
    "Concepts",
    "DeepFeatureFactorization",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GenericAttention",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "ISCAM",
    "KernelPCACAM",
    "LayerCAM",
    "LeGrad",
    "MapContext",
    "RandomCAM",
    "SSCAM",
    "ScoreCAM",
    "ShapleyCAM",
    "SmoothGradCAMpp",
    "XGradCAM",
    "describe",
    "registry",
    "get",
    "names",
]
