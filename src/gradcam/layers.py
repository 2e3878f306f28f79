"""Finding the layer to explain: candidate layers in execution order and the automatic choice.

Grad-CAM (Selvaraju et al., ICCV 2017) uses "the last convolutional layer", whose neurons see
class-specific, spatially resolved parts of the image. We make that precise and architecture-free.

* **CNNs** (no attention module): the last module, in execution (completion) order, whose output is a
  feature map with a spatial grid h*w > 1 (its layout decided as in :mod:`gradcam.layouts`), among
  modules that run exactly once per forward. Modules called several times per forward (a shared
  activation module, as EfficientNet's ``_swish``) have no single activation and are skipped.
* **Transformers** (any attention module, see :mod:`gradcam.attention`): the *input of the last block's
  attention*, where the patch tokens still reach the class token: timm's ``blocks[-1].norm1``,
  torchvision's ``encoder.layers[-1].ln_1``, Hugging Face's ``layer[-1].layernorm_before``. It is the
  module whose output tensor is the one the last attention module receives; when the attention receives
  a tensor no module produced (Swin partitions its input into windows with plain functions), it is the
  last module of the same block that completed before that attention started and whose layout rests on
  more than geometry (a norm, linear or convolution, or tokens on the patch grid: Swin's
  ``blocks[-1].norm1``). A model whose attention has no such input (MaxViT feeds it partitioned grids)
  gets the CNN choice. Never the final norm: after it a class-token model's score no longer depends on
  the patch tokens, and the map would be zero.
* **Segmenters and detectors** (torchvision's FCN, DeepLabV3, LRASPP, Faster R-CNN, RetinaNet, FCOS,
  SSD): the last stage of the backbone (:func:`backbone_stage`), the deepest feature map that still
  belongs to every pixel, not the heads after it nor the FPN, whose output is a dict of levels.
  Video CNNs (r3d_18, mc3_18, r2plus1d_18) get the CNN choice on their (B, C, t, h, w) outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from gradcam import layouts
from gradcam.attention import attention_modules, inside_attention
from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass.

    ``layout`` describes how its output reads as a feature map (``"channels-first 7x7"``,
    ``"tokens 1+14x14"``), ``grid`` is that map's (h, w); both None when it cannot be read as one, and
    ``reason`` then says why. ``attention_input`` marks the layers that feed an attention module.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    calls: int
    layout: str | None = None
    grid: tuple[int, int] | None = None
    reason: str | None = None
    attention_input: bool = False

    @property
    def is_candidate(self) -> bool:
        """True when Grad-CAM can use this layer: runs once, reads as a map with h*w > 1."""
        return self.calls == 1 and self.grid is not None and self.grid[0] * self.grid[1] > 1


@dataclass
class _Record:
    kind: str
    shape: tuple[int, ...] | None = None
    calls: int = 0


@dataclass
class _AttentionCall:
    name: str
    input_id: int | None
    completed_before: int  # how many modules had completed when the attention started


def _read(
    model: nn.Module,
    name: str,
    record: _Record,
    size: tuple[int, int],
    batch: int,
    facts: layouts.ModelFacts,
    attention: list[str],
) -> tuple[str | None, tuple[int, int] | None, str | None]:
    shape = record.shape
    if shape is None:
        return None, None, "not a tensor"
    try:
        layout = layouts.decide(
            model,
            name,
            model.get_submodule(name),
            shape,
            size,
            inside_attention=inside_attention(name, attention),
            facts=facts,
            batch=batch,
        )
    except layouts.LayoutError as error:
        return None, None, error.reason
    return layout.describe(shape), layout.grid_of(shape), None


def _typed(model: nn.Module, info: LayerInfo) -> bool:
    """True when the layer's layout rests on more than geometry: tokens placed by the model's patch
    grid, or a 4-D output whose producing module says how its axes run."""
    shape = info.output_shape or ()
    if len(shape) == 3:
        return True
    return len(shape) == 4 and layouts.module_reading(model.get_submodule(info.name), shape) is not None


@dataclass
class _Trace:
    """What one hooked forward saw: a record of each module that ran, in completion order, which module
    first produced each output tensor, and the attention calls with the tensor each received."""

    records: dict[str, _Record] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    produced: dict[int, str] = field(default_factory=dict)
    alive: list[torch.Tensor] = field(default_factory=list)  # keeps the ids in ``produced`` unique
    calls: list[_AttentionCall] = field(default_factory=list)

    def attention_hook(self, name: str) -> Callable[..., None]:
        """The forward pre-hook (with kwargs) of attention module ``name``."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            first_id = None
            if isinstance(first, torch.Tensor):
                first_id = id(first)
                self.alive.append(first)  # its id must not be reused by a later output
            self.calls.append(_AttentionCall(name, first_id, len(self.order)))

        return pre_hook

    def module_hook(self, name: str) -> Callable[..., None]:
        """The forward hook of module ``name``."""

        def hook(module: nn.Module, args: object, output: object) -> None:
            record = self.records.setdefault(name, _Record(type(module).__name__))
            record.calls += 1
            if record.calls == 1:
                self.order.append(name)
                if isinstance(output, torch.Tensor):
                    record.shape = tuple(output.shape)
                    # A module returning its input leaves the tensor to the module that produced it.
                    self.produced.setdefault(id(output), name)
                    self.alive.append(output)

        return hook


def _trace(model: nn.Module, inputs: torch.Tensor, attention: list[str]) -> _Trace:
    """One inference forward in eval mode with every submodule hooked (each module once, also when it is
    registered under several names); the hooks are removed and the flags restored, also on error."""
    trace = _Trace()
    handles = []
    seen: set[int] = set()
    with eval_mode(model):
        try:
            for name, module in model.named_modules():
                if not name or id(module) in seen:
                    continue
                seen.add(id(module))
                if name in attention:
                    hook = trace.attention_hook(name)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                handles.append(module.register_forward_hook(trace.module_hook(name)))
            with torch.inference_mode():
                model(inputs)
        finally:
            for handle in handles:
                handle.remove()
    return trace


def list_layers(model: nn.Module, inputs: torch.Tensor) -> list[LayerInfo]:
    """Run one inference forward on ``inputs`` and list every submodule in the order it completed.

    Each entry gives the output shape of the module's first call (None when not a tensor), how many
    times it ran, and how its output reads as a feature map. Modules that never ran are left out. The
    model is left as found.
    """
    if not isinstance(inputs, torch.Tensor):
        raise GradCAMError(f"inputs must be a tensor, got {type(inputs).__name__}")
    attention = attention_modules(model)
    trace = _trace(model, inputs, attention)
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    facts = layouts.model_facts(model)
    infos = []
    for name in trace.order:
        record = trace.records[name]
        layout, grid, reason = _read(model, name, record, size, len(inputs), facts, attention)
        infos.append(LayerInfo(name, record.kind, record.shape, record.calls, layout, grid, reason))
    typed = {info.name for info in infos if info.is_candidate and _typed(model, info)}
    return _mark_attention_inputs(infos, trace.calls, trace.produced, typed)


def _mark_attention_inputs(
    infos: list[LayerInfo], calls: list[_AttentionCall], produced: dict[int, str], typed: set[str]
) -> list[LayerInfo]:
    """Mark, for each attention call, the layer that fed it (see the module docstring): the module whose
    output the attention received, else the last layer of the same block that completed before the
    attention started and whose layout rests on more than geometry (``typed``)."""
    index = {info.name: position for position, info in enumerate(infos)}
    marked = set()
    for call in calls:
        producer = produced.get(call.input_id) if call.input_id is not None else None
        fed = producer is not None and index[producer] < call.completed_before
        if fed and infos[index[producer]].is_candidate:
            marked.add(producer)
            continue
        block = call.name.rpartition(".")[0]
        for info in reversed(infos[: call.completed_before]):
            inside_block = info.name.startswith(block + ".") and not info.name.startswith(call.name)
            if info.name in typed and inside_block:
                marked.add(info.name)
                break
    return [replace(info, attention_input=True) if info.name in marked else info for info in infos]


def choose_layer(layers: list[LayerInfo]) -> str:
    """The automatic choice among listed layers (see the module docstring): the input of the last
    attention when the model has attention, else the last candidate in execution order."""
    feeding = [info for info in layers if info.attention_input]
    if feeding:
        return feeding[-1].name
    for info in reversed(layers):
        if info.is_candidate:
            return info.name
    raise GradCAMError(
        "no layer outputs a feature map with spatial size > 1 and runs once per forward; "
        "pass layer= explicitly"
    )


def backbone_stage(model: nn.Module) -> str | None:
    """The last stage of a segmenter's or detector's ``backbone`` (see the module docstring), or None
    when the model has no such backbone.

    torchvision's segmenters and R-CNN-style detectors wrap the backbone's stages in an
    ``IntermediateLayerGetter`` (the detectors inside ``backbone.body``, under an FPN): its last child is
    the last stage (``backbone.layer4``, ``backbone.body.layer4``, ``backbone.body.16``). SSD's backbone
    runs ``features`` (VGG: as one module; SSDLite: block by block) before its extra layers.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    prefix = "backbone"
    body = getattr(backbone, "body", None)
    if isinstance(body, nn.ModuleDict):
        backbone, prefix = body, "backbone.body"
    if isinstance(backbone, nn.ModuleDict) and len(backbone):
        return f"{prefix}.{list(backbone.keys())[-1]}"
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential) and len(features):
        vgg = type(backbone).__name__ == "SSDFeatureExtractorVGG"
        return f"{prefix}.features" if vgg else f"{prefix}.features.{len(features) - 1}"
    return None


def find_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """Qualified name of the layer Grad-CAM uses by default for ``model`` on inputs like ``inputs``
    (see the module docstring). Costs one inference forward of one image."""
    return choose_layer(list_layers(model, inputs))
