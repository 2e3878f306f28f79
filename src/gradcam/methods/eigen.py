"""Principal-component maps: Eigen-CAM, its gradient-weighted variant and its kernel variant (KPCA-CAM)."""

from __future__ import annotations

import torch
from torch import nn

from gradcam.layouts import LayoutSpec
from gradcam.methods.base import CAM, LayersSpec, MapContext
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


class KernelPCACAM(CAM):
    r"""KPCA-CAM (Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision Models using
    Kernel-based Principal Component Analysis", 2024): Eigen-CAM with the principal component taken in a
    kernel's feature space.

    With O the centred activations of one image as an (h*w) x K matrix (rows: positions), the kernel
    matrix K_{pq} = k(O_p, O_q) is centred and its first eigenvector u_1 (eigenvalue lambda_1) gives the
    positions' projections on the first kernel principal component:

        L = ReLU( sqrt(lambda_1) u_1 )            reshaped to (h, w)

    computed by scikit-learn's ``KernelPCA(n_components=1, kernel=kernel, gamma=gamma)`` (pytorch-grad-cam's
    defaults: the sigmoid kernel tanh(gamma <x, y> + 1), gamma 1/K). Class-agnostic, like Eigen-CAM; the
    sign of u_1 is arbitrary, and is chosen so that the map correlates positively with the channel sum
    (pytorch-grad-cam keeps scikit-learn's sign).
    """

    method = "kpcacam"
    uses_gradients = False
    class_specific = False

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        kernel: str = "sigmoid",
        gamma: float | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(model, layer, layout=layout)
        self.kernel, self.gamma = kernel, gamma

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        from sklearn.decomposition import KernelPCA

        maps = []
        for features in activations.detach().double().cpu():
            channels, height, width = features.shape
            positions = features.reshape(channels, -1).T.numpy()
            positions = positions - positions.mean(axis=0)
            projection = KernelPCA(n_components=1, kernel=self.kernel, gamma=self.gamma).fit_transform(
                positions
            )
            projection = torch.from_numpy(projection[:, 0])
            channel_sum = features.sum(dim=0).flatten()
            if float((projection * (channel_sum - channel_sum.mean())).sum()) < 0:
                projection = -projection
            maps.append(torch.relu(projection).reshape(height, width))
        return torch.stack(maps).to(activations.device, activations.dtype)
