"""Hugging Face image classifiers: ``hf:<folder>`` (a ``save_pretrained`` folder) or ``hf:<org/name>``
already in the Hugging Face hub cache. Everything is read with ``local_files_only=True``: nothing is
downloaded.

The module is transformers' own ``AutoModelForImageClassification`` (its forward returns an
``ImageClassifierOutput``; the logits are its ``.logits``), with the attention implementation that
transformers chooses. Preprocessing is the saved image processor's, rebuilt as a :class:`Preprocess`
(PIL resizing, as transformers' PIL backend does; its torchvision backend resizes tensors, which
differs from PIL by rounding only). Processors whose steps a :class:`Preprocess` cannot express are
refused with one line rather than approximated; the one difference kept is the centre crop's offset,
which transformers floors and torchvision rounds (one pixel at most, when the margin is odd).
"""

from __future__ import annotations

import re
from pathlib import Path

from torchvision.transforms.functional import InterpolationMode

from gradcam.errors import GradCAMError
from gradcam.models import hub_cache
from gradcam.models.base import LoadedModel, Preprocess
from gradcam.models.checkpoint import read_labels

PREFIX = "hf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-/]+)?$")
# PIL's resampling codes, as image processors store them (transformers.image_utils.PILImageResampling).
_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


def check(target: str) -> str:
    """``target`` (no prefix) when it is an existing folder or has the form of a hub repo id, else a
    one-line GradCAMError. Whether the hub cache holds the repo is found out by :func:`load`."""
    if not target:
        raise GradCAMError(f"model '{PREFIX}' names nothing; expected hf:<folder> or hf:<org/name>")
    if Path(target).expanduser().is_dir() or _REPO_ID.match(target):
        return target
    raise GradCAMError(
        f"model '{PREFIX}{target}' not found: no such folder, and not a Hugging Face repo id (org/name)"
    )


def _sources(target: str) -> dict[str, object]:
    """``from_pretrained`` arguments for a folder or a repo id in the hub cache (one-line error if absent)."""
    folder = Path(target).expanduser()
    if folder.is_dir():
        return {"pretrained_model_name_or_path": str(folder), "local_files_only": True}
    repo_id, revision = hub_cache.split_revision(target)
    if hub_cache.cached_file(target, ["config.json"]) is None:
        raise GradCAMError(
            f"model '{PREFIX}{target}' not found: no folder {target}, and the Hugging Face hub cache "
            f"{hub_cache.cache_dir()} holds no {repo_id} (nothing is downloaded)"
        )
    return {
        "pretrained_model_name_or_path": repo_id,
        "revision": revision or "main",
        "cache_dir": str(hub_cache.cache_dir()),
        "local_files_only": True,
    }


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).strip().split("\n", 1)[0].split())
    return (text[:200] + "...") if len(text) > 200 else text or type(error).__name__


def _field(size: object, key: str) -> int | None:
    """``size[key]`` for a dict (transformers 4) or a SizeDict (transformers 5); None when unset."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _per_channel(value: object, what: str, spec: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]  # type: ignore[union-attr]
    if len(values) != 3:
        raise GradCAMError(f"model '{spec}': image_{what} has {len(values)} values; expected 3 (RGB)")
    return values[0], values[1], values[2]


def _geometry(processor: object, spec: str) -> tuple[int | tuple[int, int], int | tuple[int, int] | None]:
    """(resize, crop) of a :class:`Preprocess` doing what the processor's resize and crop do."""
    kind = type(processor).__name__
    size = getattr(processor, "size", None)
    height, width = _field(size, "height"), _field(size, "width")
    shortest = _field(size, "shortest_edge")
    if not getattr(processor, "do_resize", False) or size is None:
        raise GradCAMError(f"model '{spec}': {kind} does not resize images; expected a fixed input size")
    if any(_field(size, k) for k in ("longest_edge", "max_height", "max_width")):
        raise _unsupported_size(spec, kind, size)
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct is not None:
        if not kind.startswith("ConvNext") or not shortest or getattr(processor, "do_center_crop", False):
            raise GradCAMError(f"model '{spec}': {kind} with crop_pct is not supported")
        # ConvNeXT's resize: below 384, shorter side to shortest/crop_pct then a centre crop; else a warp.
        if shortest < 384:
            return int(shortest / crop_pct), shortest
        return (shortest, shortest), None
    resize: int | tuple[int, int]
    if height and width and not shortest:
        resize = (height, width)
    elif shortest and not (height or width):
        resize = shortest
    else:
        raise _unsupported_size(spec, kind, size)
    if not getattr(processor, "do_center_crop", False):
        if isinstance(resize, int):
            raise GradCAMError(
                f"model '{spec}': {kind} resizes the shorter side to {resize} without a crop, so the input "
                "size varies with the image; not supported"
            )
        return resize, None
    crop_size = getattr(processor, "crop_size", None)
    crop_height, crop_width = _field(crop_size, "height"), _field(crop_size, "width")
    if not crop_height or not crop_width:
        raise GradCAMError(
            f"model '{spec}': {kind} crop_size {_shown(crop_size)} is not supported; expected height/width"
        )
    return resize, (crop_height if crop_height == crop_width else (crop_height, crop_width))


def _unsupported_size(spec: str, kind: str, size: object) -> GradCAMError:
    return GradCAMError(
        f"model '{spec}': {kind} size {_shown(size)} is not supported; expected height/width or shortest_edge"
    )


def _shown(size: object) -> str:
    if isinstance(size, dict):
        return str({k: v for k, v in size.items() if v})
    return str({k: v for k, v in vars(size).items() if v}) if hasattr(size, "__dict__") else str(size)


def preprocess_from_processor(processor: object, spec: str) -> Preprocess:
    """The image processor's resize, crop, rescale and normalisation as a :class:`Preprocess`."""
    kind = type(processor).__name__
    if getattr(processor, "do_pad", False):
        raise GradCAMError(f"model '{spec}': {kind} pads images; not supported")
    resize, crop = _geometry(processor, spec)
    resample = getattr(processor, "resample", None)
    if isinstance(resample, InterpolationMode):
        interpolation = resample
    elif resample is None:
        interpolation = InterpolationMode.BILINEAR  # what transformers uses when none is set
    elif int(resample) in _RESAMPLE:
        interpolation = _RESAMPLE[int(resample)]
    else:
        raise GradCAMError(f"model '{spec}': {kind} resample {resample!r} is not supported")
    # transformers computes (p * rescale - mean) / std for pixel values p in 0..255; a Preprocess computes
    # (p / 255 - mean') / std', which is the same with mean' = mean / (255 rescale), std' likewise.
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 1.0
    if getattr(processor, "do_normalize", False):
        mean = _per_channel(processor.image_mean, "mean", spec)
        std = _per_channel(processor.image_std, "std", spec)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    factor = 255.0 * rescale
    return Preprocess(
        resize=resize,
        crop=crop,
        mean=tuple(m / factor for m in mean),
        std=tuple(s / factor for s in std),
        interpolation=interpolation,
    )


def load(
    target: str, *, pretrained: bool = True, weights: str | None = None, labels: str | None = None
) -> LoadedModel:
    """Build the classifier saved in folder ``target`` or hub repo ``target`` (no prefix), offline;
    ``pretrained=False`` builds it from its config with random weights."""
    spec = PREFIX + target
    if weights is not None:
        raise GradCAMError(
            f"model '{spec}': weights=FILE (--weights) is not used for hf: models; their weights come "
            "from the folder or repo"
        )
    check(target)
    sources = _sources(target)
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    stage = "config (config.json)"
    try:
        config = AutoConfig.from_pretrained(**sources)
        stage = "image processor (preprocessor_config.json)"
        processor = AutoImageProcessor.from_pretrained(**sources)
        stage = "image classifier"
        if pretrained:
            module = AutoModelForImageClassification.from_pretrained(**sources)
        else:
            module = AutoModelForImageClassification.from_config(config)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for the same thing
        raise GradCAMError(f"model '{spec}': cannot load its {stage}: {_first_line(error)}") from None
    preprocess = preprocess_from_processor(processor, spec)
    num_classes = int(module.config.num_labels)
    if labels is not None:
        names = read_labels(labels, num_classes)
    else:
        id2label = module.config.id2label or {}
        names = [str(id2label.get(i, id2label.get(str(i), f"class {i}"))) for i in range(num_classes)]
    return LoadedModel(name=spec, module=module.eval(), preprocess=preprocess, labels=names)
