"""Gradient-weighted CAM methods."""

from __future__ import annotations

import torch

from gradcam.methods.base import CAM


class GradCAM(CAM):
    r"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017).

    For activations A^k (k channels, positions i,j) of a convolutional layer and the pre-softmax
    score y^c:

        alpha_k^c = (1/Z) sum_{i,j} dy^c / dA^k_{ij}          (Z = h*w, eq. 1)
        L^c       = ReLU( sum_k alpha_k^c A^k )               (eq. 2)

    The counterfactual map (section 5 of the paper) uses -dy^c/dA^k_{ij}.

    Example:
        >>> cam = GradCAM(model, "layer4")
        >>> explanation = cam(batch)              # each image's top-1 class
        >>> explanation.maps.shape                # (B, H, W), each map scaled to [0, 1]
    """

    method = "gradcam"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3))
