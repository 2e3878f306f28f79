"""The original class activation map, read from the classifier's own weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.methods.base import CAM, MapContext


class ClassActivationMap(CAM):
    r"""CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

    For a network whose logits are a linear layer on the globally average-pooled activations of the
    layer, y^c = sum_k w_k^c (1/Z) sum_{i,j} A^k_{ij} + b^c, the map of class c is

        M^c = ReLU( sum_k w_k^c A^k )

    The paper's map (its eq. 2, and torchcam's ``CAM``) is the sum before the ReLU; like every map here
    (Grad-CAM's eq. 2) we keep its positive part, the evidence for the class.

    No gradient is used: w^c is the row of the classifier's weight matrix. The head is not guessed: a
    linear layer of the model is used only if it turns the layer's pooled activations into the very
    logits of the explained forward (to 1e-4); a model whose head is anything else is refused in one
    line. Where CAM applies, Grad-CAM's alpha_k^c equals w_k^c / Z (Grad-CAM paper, section 3.1), so
    Grad-CAM's map is CAM's divided by Z = h w.
    """

    method = "cam"
    uses_gradients = False

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        if context.logits is None or bool((context.targets < 0).any()):
            raise GradCAMError("cam reads a classifier's weights of a class; explain class indices of logits")
        weights = _head_weights(context.model, activations, context.logits, context.layer)
        return weights[context.targets][..., None, None] * activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(self.weighted_activations(activations, gradients, context).sum(dim=-3))


def _head_weights(
    model: nn.Module, activations: torch.Tensor, logits: torch.Tensor, layer: str
) -> torch.Tensor:
    """The (classes, K) weights of the linear layer that maps the layer's pooled activations (B, K) to the
    logits; a one-line refusal when no linear layer of the model does."""
    pooled = activations.mean(dim=(-2, -1))
    classes, channels = logits.shape[-1], pooled.shape[-1]
    scale = float(logits.abs().max()) or 1.0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.shape != (classes, channels):
            continue
        weight = module.weight.detach().to(pooled.dtype)
        bias = None if module.bias is None else module.bias.detach().to(pooled.dtype)
        if torch.allclose(
            F.linear(pooled, weight, bias), logits.to(pooled.dtype), rtol=1e-4, atol=1e-4 * scale
        ):
            return weight
    raise GradCAMError(
        f"cam needs the logits to be one linear layer on the global average pool of '{layer}' "
        f"({channels} channels); {type(model).__name__}'s are not: use gradcam, equal to CAM where it applies"
    )
