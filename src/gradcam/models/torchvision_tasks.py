"""torchvision's segmenters, detectors and video classifiers by name, loaded like the classifiers.

* **Segmentation** (FCN, DeepLabV3, LRASPP): the output is a dict whose ``"out"`` holds the (B, K, H, W)
  logits; explained with :class:`gradcam.targets.Segmentation`. The auxiliary head is left out (it only
  serves training), so ``"out"`` is the one entry.
* **Detection** (Faster R-CNN, RetinaNet, FCOS, SSD, Mask R-CNN): a list of (C, H, W) images in, one dict of
  boxes, labels and scores per image out; explained with :class:`gradcam.targets.Detections` or
  :class:`gradcam.targets.Box`. The detector resizes and normalises inside (its transform).
* **Video** (r3d_18, mc3_18, r2plus1d_18, s3d): clips (B, C, T, H, W) of ``clip_length`` frames, logits out.

Preprocessing comes from the weights' own transforms (``weights.transforms()``), pretrained weights
from the torch hub cache, ``--random-weights`` builds random ones, and ``--weights`` loads a fine-tuned
state dict (for another number of classes, give ``--labels`` with one name per class).
"""

from __future__ import annotations

import re

import torchvision
from torchvision.models import get_model, get_model_weights, list_models

from gradcam.errors import GradCAMError
from gradcam.models.base import LoadedModel, Preprocess
from gradcam.models.checkpoint import load_into, read_labels, read_state_dict

SEGMENTATION, DETECTION, VIDEO = "segmentation", "detection", "video"
#: Video CNNs (their feature maps are (B, C, t, h, w)); the video transformers are not offered.
VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d")
#: The clip length torchvision's video weights were evaluated with (their docs: ``clip_len=16``).
DEFAULT_CLIP_LENGTH = 16


def names() -> dict[str, str]:
    """Each offered architecture and its task."""
    found = {name: SEGMENTATION for name in list_models(module=torchvision.models.segmentation)}
    found.update({name: DETECTION for name in list_models(module=torchvision.models.detection)})
    found.update(
        {name: VIDEO for name in VIDEO_MODELS if name in list_models(module=torchvision.models.video)}
    )
    return found


def clip_length(name: str) -> int:
    """Frames per clip: the ``clip_len`` in the weights' documentation, else 16."""
    docs = str(get_model_weights(name).DEFAULT.meta.get("_docs", ""))
    match = re.search(r"clip_len=(\d+)", docs)
    return int(match.group(1)) if match else DEFAULT_CLIP_LENGTH


def _preprocess(task: str, transforms: object) -> Preprocess:
    if task == DETECTION:  # the detector resizes and normalises inside: the image as floats in [0, 1]
        return Preprocess(resize=None, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    resize = list(transforms.resize_size)  # type: ignore[attr-defined]
    crop = getattr(transforms, "crop_size", None)
    return Preprocess(
        resize=resize[0] if len(resize) == 1 else (resize[0], resize[1]),
        crop=None if crop is None else (crop[0], crop[1]),
        mean=tuple(transforms.mean),  # type: ignore[attr-defined]
        std=tuple(transforms.std),  # type: ignore[attr-defined]
        interpolation=transforms.interpolation,  # type: ignore[attr-defined]
    )


def _state(name: str, pretrained: bool, weights: str | None) -> tuple[dict | None, object]:
    from gradcam.models.torchvision_zoo import _pretrained_state, weights_path

    if weights is not None:
        return read_state_dict(weights), weights
    if pretrained:
        return _pretrained_state(name), weights_path(name)
    return None, None


def load(
    name: str, *, pretrained: bool = True, weights: str | None = None, labels: str | None = None
) -> LoadedModel:
    """Build torchvision segmenter, detector or video model ``name`` (see the module docstring)."""
    task = names().get(name)
    if task is None:
        raise GradCAMError(f"model '{name}' is not a torchvision segmentation, detection or video model")
    default = get_model_weights(name).DEFAULT
    categories = list(default.meta["categories"])
    names_ = read_labels(labels, None) if labels is not None else categories
    kwargs: dict[str, object] = {"weights": None, "num_classes": len(names_)}
    if task != VIDEO:
        kwargs["weights_backbone"] = None
    if task == SEGMENTATION:
        kwargs["aux_loss"] = False
    module = get_model(name, **kwargs)
    state, source = _state(name, pretrained, weights)
    if state is not None:
        if task == SEGMENTATION:
            state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        load_into(module, state, source)
    return LoadedModel(
        name=name,
        module=module.eval(),
        preprocess=_preprocess(task, default.transforms()),
        labels=names_,
        task=task,
        clip_length=clip_length(name) if task == VIDEO else None,
    )


def set_score_threshold(module: object, threshold: float) -> bool:
    """Lower a torchvision detector's own score threshold to ``threshold`` when it is higher, so that
    detections down to it come out (for a detector the caller loaded itself). True when changed."""
    owner = getattr(module, "roi_heads", module)
    current = getattr(owner, "score_thresh", None)
    if isinstance(current, float) and threshold < current:
        owner.score_thresh = threshold  # type: ignore[attr-defined]
        return True
    return False
