"""The engine every CAM method shares: layers, capture, targets, maps, Explanation.

A method subclasses :class:`CAM` and overrides one small function: :meth:`CAM.channel_weights`, which
turns a layer's activations A (B,K,h,w) and gradients G = dy^c/dA into channel weights alpha (B,K)
(the base class then computes L^c = ReLU(sum_k alpha_k^c A^k)), or :meth:`CAM.layer_map` for methods
whose map is not a weighted sum of channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradcam import layers as _layers
from gradcam.capture import capture, eval_mode, resolve_module
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation, normalise, upsample
from gradcam.targets import TargetSpec, resolve

LayerSpec = str | nn.Module | None
LayersSpec = LayerSpec | Sequence[str | nn.Module]


def _check_inputs(inputs: object) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise GradCAMError(f"inputs must be a float tensor (B,C,H,W), got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise GradCAMError(f"inputs must be a 4-D float tensor (B,C,H,W), got shape {tuple(inputs.shape)}")
    if not inputs.dtype.is_floating_point:
        raise GradCAMError(f"inputs must be a float tensor (B,C,H,W), got dtype {inputs.dtype}")
    if inputs.shape[0] == 0:
        raise GradCAMError("inputs must hold at least one image, got an empty batch")
    return inputs


def _check_device(model: nn.Module, inputs: torch.Tensor) -> None:
    param = next(model.parameters(), None)
    if param is not None and param.device != inputs.device:
        raise GradCAMError(
            f"inputs are on {inputs.device} but the model's parameters are on {param.device}; "
            "move the inputs or the model so that both are on the same device"
        )


def _check_not_inference(model: nn.Module) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    if any(tensor.is_inference() for tensor in tensors):
        raise GradCAMError(
            "the model's parameters or buffers are inference tensors (created under "
            "torch.inference_mode()); load or build the model outside inference mode"
        )


def _check_logits(output: object, batch: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != batch:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise GradCAMError(f"model must return logits of shape ({batch}, classes), got {got}")
    return output


@dataclass(frozen=True)
class MapContext:
    """What a method may need beyond A and G: the model, the batch and the explained classes."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    layer: str
    module: nn.Module


class CAM:
    """Base of the CAM methods. Holds the model and layer choice, no state between calls.

    A method overrides :meth:`channel_weights` (alpha from A and G), or :meth:`layer_map` when its map is
    not a weighted sum of channels. Methods that need no gradient set ``uses_gradients = False``.

    Args:
        model: a classifier returning pre-softmax scores (B, classes). Left exactly as found: the call
            runs it in eval mode and restores every module's flag, adds no lasting hook and never
            computes parameter gradients.
        layer: None (automatic, see :func:`gradcam.find_layer`), a qualified module name such as
            ``"layer4"``, the module itself, or a list of these (then a call returns one Explanation
            per layer from a single forward and backward pass).
        counterfactual: use -dy^c/dA, highlighting regions that speak against the class (gradient
            methods only).
    """

    method = "cam"
    uses_gradients = True

    def __init__(self, model: nn.Module, layer: LayersSpec = None, *, counterfactual: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise GradCAMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if counterfactual and not self.uses_gradients:
            raise GradCAMError(f"counterfactual maps need gradients; {self.method} uses none")
        self.model = model
        self.counterfactual = counterfactual
        self._multi = isinstance(layer, Sequence) and not isinstance(layer, str)
        specs = list(layer) if self._multi else [layer]
        if self._multi and not specs:
            raise GradCAMError("layer list is empty; expected at least one layer")
        if self._multi and any(spec is None for spec in specs):
            raise GradCAMError("a layer list cannot contain None; name each layer")
        self._layers = [None if spec is None else resolve_module(model, spec) for spec in specs]
        self._auto: dict[tuple, tuple[str, nn.Module]] = {}

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights alpha (B,K) from activations A and gradients G, both (B,K,h,w)."""
        raise NotImplementedError

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        """The raw (B,h,w) map of one layer; by default ReLU(sum_k alpha_k A^k)."""
        weights = self.channel_weights(activations, gradients)
        return torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))

    def _resolved_layers(self, inputs: torch.Tensor) -> list[tuple[str, nn.Module]]:
        if self._layers != [None]:
            return self._layers  # type: ignore[return-value]
        # The automatic choice costs one forward; it depends only on the architecture and the
        # per-image input shape, so it is remembered for inputs of the same shape.
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._auto:
            name = _layers.find_layer(self.model, inputs[:1])
            self._auto[key] = resolve_module(self.model, name)
        return [self._auto[key]]

    def __call__(self, inputs: torch.Tensor, targets: TargetSpec = None) -> Explanation | list[Explanation]:
        """Explain ``inputs`` (B,C,H,W) for ``targets`` (None: each image's top-1 class)."""
        inputs = _check_inputs(inputs)
        _check_device(self.model, inputs)
        _check_not_inference(self.model)
        layers = self._resolved_layers(inputs)
        batch, size = inputs.shape[0], (inputs.shape[2], inputs.shape[3])
        with torch.inference_mode(False), eval_mode(self.model):
            x = inputs.clone() if inputs.is_inference() else inputs
            with capture(self.model, layers) as (captured, run):
                logits = _check_logits(run(x), batch)
                ids = resolve(logits.detach(), targets)
                scores = logits.gather(1, ids[:, None])[:, 0]
                grads = self._gradients(scores, captured.activations, layers[0][0])
            logits = logits.detach().float()
            raws = []
            for (name, module), activation, grad in zip(layers, captured.activations, grads, strict=True):
                if self.uses_gradients and grad is None:
                    raise GradCAMError(_no_gradient(name))
                if grad is not None and self.counterfactual:
                    grad = -grad
                context = MapContext(self.model, x, ids, logits, name, module)
                raws.append(self.layer_map(activation.detach(), grad, context).float())
        probs = torch.softmax(logits, dim=1).gather(1, ids[:, None])[:, 0]
        shared = {
            "targets": ids.cpu(),
            "scores": scores.detach().float().cpu(),
            "probs": probs.cpu(),
            "logits": logits.cpu(),
            "method": self.method,
        }
        results = [
            Explanation(raw=raw.cpu(), maps=normalise(upsample(raw, size)).cpu(), layer=name, **shared)
            for (name, _), raw in zip(layers, raws, strict=True)
        ]
        return results if self._multi else results[0]

    def _gradients(
        self, scores: torch.Tensor, activations: list[torch.Tensor | None], first: str
    ) -> Sequence[torch.Tensor | None]:
        if not self.uses_gradients:
            return [None] * len(activations)
        if not scores.requires_grad:
            raise GradCAMError(_no_gradient(first))
        return torch.autograd.grad(scores.sum(), activations, allow_unused=True)


def _no_gradient(layer: str) -> str:
    return (
        f"no gradient reaches layer '{layer}' from the model output: choose a layer on the path to the "
        "output (does the model run it under torch.no_grad() or detach it?)"
    )
