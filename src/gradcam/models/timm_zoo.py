"""timm's classifiers by name (``timm:<name>``); pretrained weights read offline from the local caches.

timm downloads pretrained weights from the Hugging Face hub. Here nothing is downloaded: the file timm
would fetch is looked up in the hub cache (``huggingface_hub.try_to_load_from_cache``, a pure file-system
lookup) and handed to timm as a local ``file`` source (``pretrained_cfg_overlay``), so that timm still
applies its own checkpoint filters (``checkpoint_filter_fn``, label offsets, ...) without any network
call. The few weights timm only knows by URL are looked up in the torch hub cache the same way.

Preprocessing is timm's evaluation transform for the model's data config
(``timm.data.resolve_data_config`` + ``transforms_imagenet_eval``), rebuilt as a :class:`Preprocess`.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.transforms.functional import InterpolationMode

from gradcam.errors import GradCAMError
from gradcam.models import hub_cache
from gradcam.models.base import LoadedModel, Preprocess
from gradcam.models.checkpoint import (
    classifier_name,
    load_into,
    num_classes_in,
    read_labels,
    read_state_dict,
)
from gradcam.models.efficientnet_lite import imagenet_labels

PREFIX = "timm:"
DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT: the eval crop when a config names none
_INTERPOLATIONS = {  # timm's interpolation names (timm.data.transforms.str_to_interp_mode)
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


def check(name: str) -> str:
    """``name`` (no prefix; ``arch`` or ``arch.tag``) when timm knows it, else a one-line GradCAMError."""
    if not name:
        raise GradCAMError(f"model '{PREFIX}' names nothing; expected timm:<name>, e.g. timm:resnet50")
    if ":" in name or "/" in name or not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
        raise GradCAMError(f"model '{PREFIX}{name}' not found; {hint}timm.list_models() lists timm's names")
    try:
        get_pretrained_cfg(name)
    except RuntimeError:  # a known architecture with an unknown pretrained tag
        arch, _, tag = name.partition(".")
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise GradCAMError(
            f"model '{PREFIX}{name}' not found: {arch} has no pretrained tag '{tag}'; "
            f"its tags: {', '.join(tags[:8]) or 'none'}"
        ) from None
    return name


def hub_filenames(hf_hub_filename: str | None) -> list[str]:
    """The files timm's hub loader tries, in its order (``timm.models._hub.load_state_dict_from_hf``):
    the safetensors alternative first, then the named file (``pytorch_model.bin`` unless the config
    names another)."""
    filename = hf_hub_filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == "pytorch_model.bin":
        return ["model.safetensors", filename]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors", filename]
    return [filename]


def pretrained_file(name: str) -> Path:
    """The local file holding the pretrained weights of timm model ``name``, or a one-line error."""
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        filenames = hub_filenames(cfg.hf_hub_filename)
        found = hub_cache.cached_file(cfg.hf_hub_id, filenames)
        if found is None:
            raise GradCAMError(
                f"pretrained weights for '{PREFIX}{name}' not found: put {filenames[0]} of the Hugging Face "
                f"repo {cfg.hf_hub_id} into the hub cache {hub_cache.cache_dir()} (nothing is downloaded), "
                "or use pretrained=False (--random-weights) for random weights"
            )
        return found
    if cfg is not None and cfg.url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if not found.is_file():
            raise GradCAMError(
                f"pretrained weights for '{PREFIX}{name}' not found: put {found.name} (from {cfg.url}) into "
                f"{found.parent}, or use pretrained=False (--random-weights) for random weights"
            )
        return found
    raise GradCAMError(
        f"model '{PREFIX}{name}' has no pretrained weights; use pretrained=False (--random-weights) "
        "or weights=FILE (--weights)"
    )


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[-1].split()) if text else type(error).__name__


def _create(name: str, **kwargs: object) -> nn.Module:
    """``timm.create_model`` with a one-line error when the model cannot be built."""
    try:
        return timm.create_model(name, **kwargs)
    except Exception as error:  # timm raises many types (RuntimeError, AssertionError, ...)
        raise GradCAMError(f"model '{PREFIX}{name}': timm cannot build it ({_last_line(error)})") from None


def _create_pretrained(name: str, file: Path) -> nn.Module:
    """timm's own pretrained build, with ``file`` as the weight source: timm's filters apply, no network."""
    cfg = get_pretrained_cfg(name)
    # A hub file is a plain state dict (timm ignores custom_load on that path, unless a model loads its own
    # named hub file with custom_load="hf"); a URL file keeps the config's format (e.g. .npz, custom_load).
    custom = cfg.custom_load == "hf" and bool(cfg.hf_hub_filename) if cfg.hf_hub_id else bool(cfg.custom_load)
    overlay = {"file": str(file), "custom_load": custom}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as error:  # a corrupt or foreign file: safetensors, pickle and shape errors alike
        raise GradCAMError(
            f"pretrained weights file {file} for '{PREFIX}{name}' cannot be loaded: {_last_line(error)}"
        ) from None


def _classifier(name: str) -> str:
    """Name of the (first) classifier module, from the pretrained config or else a probe model."""
    cfg = get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    if isinstance(classifier, (tuple, list)):  # distilled models: ("head", "head_dist")
        classifier = classifier[0]
    if classifier:
        return classifier
    with torch.device("meta"):  # only the module names matter
        probe = _create(name)
    return classifier_name(probe, int(probe.num_classes))


def preprocess_from_config(config: dict[str, object], spec: str) -> Preprocess:
    """timm's eval transform (``transforms_imagenet_eval``) for a data config, as a :class:`Preprocess`."""
    height, width = (int(v) for v in config["input_size"][-2:])  # type: ignore[index]
    crop_pct = float(config.get("crop_pct") or DEFAULT_CROP_PCT)  # type: ignore[arg-type]
    mode = config.get("crop_mode") or "center"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    crop: int | tuple[int, int] = height if height == width else (height, width)
    resize: int | tuple[int, int]
    if mode == "squash":
        resize = scale
    elif mode == "center" and scale[0] == scale[1]:
        resize = scale[0]  # shorter side to scale, as torchvision's Resize(int)
    elif mode == "center":
        raise GradCAMError(
            f"model '{spec}': timm's centre crop of a non-square input ({height}x{width}) is not supported; "
            "expected a square input size"
        )
    else:
        raise GradCAMError(
            f"model '{spec}': timm crop_mode '{mode}' is not supported; expected center or squash"
        )
    interpolation = _INTERPOLATIONS.get(str(config.get("interpolation")))
    if interpolation is None:
        raise GradCAMError(
            f"model '{spec}': interpolation '{config.get('interpolation')}' is not supported; "
            f"expected one of {', '.join(_INTERPOLATIONS)}"
        )
    mean, std = tuple(config["mean"]), tuple(config["std"])  # type: ignore[arg-type]
    if len(mean) != 3 or len(std) != 3:
        raise GradCAMError(f"model '{spec}' takes {len(mean)}-channel input; expected RGB (3 channels)")
    return Preprocess(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


def _labels(num_classes: int, labels: str | None) -> list[str]:
    if labels is not None:
        return read_labels(labels, num_classes)
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class {i}" for i in range(num_classes)]


def load(
    name: str, *, pretrained: bool = True, weights: str | None = None, labels: str | None = None
) -> LoadedModel:
    """Build timm model ``name`` (no prefix): pretrained from the local caches, a user's state dict
    (.pth/.pt/.bin or .safetensors; the number of classes is read from it), or random weights."""
    check(name)
    if weights is not None:
        state = read_state_dict(weights)
        num_classes = num_classes_in(state, _classifier(name), weights)
        module = _create(name, num_classes=num_classes)
        load_into(module, state, weights)
    elif pretrained:
        module = _create_pretrained(name, pretrained_file(name))
    else:
        module = _create(name)
    spec = PREFIX + name
    preprocess = preprocess_from_config(resolve_data_config({}, model=module), spec)
    names = _labels(int(module.num_classes), labels)
    return LoadedModel(name=spec, module=module.eval(), preprocess=preprocess, labels=names)
