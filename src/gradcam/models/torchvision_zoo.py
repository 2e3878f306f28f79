"""torchvision's ImageNet classifiers by name, weights read from the local torch hub cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models

from gradcam.errors import GradCAMError
from gradcam.models.base import LoadedModel, Preprocess
from gradcam.models.checkpoint import (
    classifier_name,
    load_into,
    num_classes_in,
    read_labels,
    read_state_dict,
)

# Old DenseNet checkpoints name parameters "norm.1.weight"; the modules are "norm1".
_DENSENET_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_\w+))$")


def names() -> list[str]:
    """torchvision's image classification architectures."""
    return sorted(list_models(module=torchvision.models))


def weights_path(name: str) -> Path:
    """Where the default pretrained weights of ``name`` are expected: the torch hub cache."""
    url = get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _pretrained_state(name: str) -> dict[str, torch.Tensor]:
    path = weights_path(name)
    if not path.is_file():
        url = get_model_weights(name).DEFAULT.url
        raise GradCAMError(
            f"pretrained weights for '{name}' not found: put {path.name} (from {url}) into "
            f"{path.parent}, or use pretrained=False (--random-weights) for random weights"
        )
    return read_state_dict(path)


def _renamed(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet checkpoints (torchvision's own included) use "norm.1"-style keys."""
    if name.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return state


def _build_kwargs(name: str, default: WeightsEnum, pretrained: bool) -> dict[str, object]:
    """Constructor arguments torchvision's own builder would use with ``default`` weights."""
    kwargs: dict[str, object] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
        if pretrained:
            # torchvision's pretrained GoogLeNet/Inception expect this re-normalisation of the input.
            kwargs["transform_input"] = True
    min_size = default.meta.get("min_size", (224, 224))
    if name.startswith("vit_"):
        kwargs["image_size"] = min_size[0]  # e.g. vit_h_14's default weights are 518x518
    elif name.startswith("maxvit"):
        kwargs["input_size"] = tuple(min_size)
    return kwargs


def load(
    name: str, *, pretrained: bool = True, weights: str | None = None, labels: str | None = None
) -> LoadedModel:
    """Build torchvision classifier ``name``: pretrained, a user's state dict, or random weights."""
    default = get_model_weights(name).DEFAULT
    transforms = default.transforms()
    categories = list(default.meta["categories"])
    state = None
    source: object = weights
    if weights is not None:
        state = read_state_dict(weights)
        probe = get_model(name, weights=None)
        num_classes = num_classes_in(state, classifier_name(probe, len(categories)), weights)
    else:
        num_classes = len(categories)
        if pretrained:
            state = _pretrained_state(name)
            source = weights_path(name)
    kwargs = _build_kwargs(name, default, pretrained=weights is None and pretrained)
    module = get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if state is not None:
        state = _renamed(name, state)
        if name in ("googlenet", "inception_v3"):
            state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
        load_into(module, state, source)
    if labels is not None:
        names_ = read_labels(labels, num_classes)
    elif num_classes == len(categories):
        names_ = categories
    else:
        names_ = [f"class {i}" for i in range(num_classes)]
    preprocess = Preprocess(
        resize=transforms.resize_size[0],
        crop=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation,
    )
    return LoadedModel(name=name, module=module.eval(), preprocess=preprocess, labels=names_)
