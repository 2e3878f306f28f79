"""Finding the layer to explain: candidate layers in execution order and the automatic choice.

Grad-CAM (Selvaraju et al., ICCV 2017) uses "the last convolutional layer", whose neurons see
class-specific, spatially resolved parts of the image. We make that precise and architecture-free:
the last module, in execution (completion) order, whose output is a 4-D tensor with spatial size
h*w > 1, among modules that run exactly once per forward. Modules called several times per forward
(a shared activation module, as EfficientNet's ``_swish``) have no single activation and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass."""

    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    calls: int

    @property
    def is_candidate(self) -> bool:
        """True when Grad-CAM can use this layer: runs once, outputs (B,C,h,w) with h*w > 1."""
        shape = self.output_shape
        return self.calls == 1 and shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def list_layers(model: nn.Module, inputs: torch.Tensor) -> list[LayerInfo]:
    """Run one inference forward on ``inputs`` and list every submodule in the order it completed.

    Each entry gives the output shape of the module's first call (None when not a tensor) and how
    many times it ran. Modules that never ran are left out. The model is left as found.
    """
    if not isinstance(inputs, torch.Tensor):
        raise GradCAMError(f"inputs must be a tensor, got {type(inputs).__name__}")
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    kinds: dict[str, str] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                order.append(name)
                shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
                kinds[name] = type(module).__name__

        return hook

    seen: set[int] = set()
    with eval_mode(model):
        try:
            for name, module in model.named_modules():
                if not name or id(module) in seen:
                    continue
                seen.add(id(module))
                handles.append(module.register_forward_hook(make_hook(name)))
            with torch.inference_mode():
                model(inputs)
        finally:
            for handle in handles:
                handle.remove()
    return [LayerInfo(n, kinds[n], shapes[n], calls[n]) for n in order]


def choose_layer(layers: list[LayerInfo]) -> str:
    """The automatic choice among listed layers: the last candidate in execution order."""
    for info in reversed(layers):
        if info.is_candidate:
            return info.name
    raise GradCAMError(
        "no layer outputs a 4-D tensor with spatial size > 1 and runs once per forward; "
        "pass layer= explicitly"
    )


def find_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """Qualified name of the layer Grad-CAM uses by default for ``model`` on inputs like ``inputs``.

    The last module, in execution order, whose output is a 4-D tensor with spatial size > 1, among
    modules that run once per forward (see the module docstring). Costs one inference forward.
    """
    return choose_layer(list_layers(model, inputs))
