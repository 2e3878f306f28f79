"""Principal-component maps: Eigen-CAM and its gradient-weighted variant."""

from __future__ import annotations

import torch

from gradcam.methods.base import CAM, MapContext
from gradcam.methods.pca import first_component


class EigenCAM(CAM):
    r"""Eigen-CAM (Bany Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020).

    With O the activations of one image as an (h*w) x K matrix and O = U S V^T its singular value
    decomposition, the map is the projection on the first right singular vector:

        L = ReLU( O v_1 )   reshaped to (h, w)

    Class-agnostic: it uses no gradient, so every target gets the same map. As in the paper the SVD is of
    O itself; pytorch-grad-cam centres O first (a PCA), which we do not. The sign of v_1 is fixed so that
    the map agrees with the channel sum of the activations.
    """

    method = "eigencam"
    uses_gradients = False

    class_specific = False

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(first_component(self.weighted_activations(activations, gradients, context)))


class EigenGradCAM(CAM):
    r"""Eigen-Grad-CAM: Eigen-CAM of the gradient-weighted activations, which makes it class-specific.

        L^c = ReLU( (G (element-wise *) A) v_1 ),   G = dS^c/dA, SVD as in :class:`EigenCAM`

    No paper defines it; it is the variant pytorch-grad-cam introduced, without its centring (see
    :class:`EigenCAM`).
    """

    method = "eigengradcam"

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return gradients * activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(first_component(self.weighted_activations(activations, gradients, context)))
