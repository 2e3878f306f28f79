"""Gradient-weighted CAM methods."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation
from gradcam.layouts import LayoutSpec
from gradcam.methods.base import CAM, Chooser, Inputs, LayersSpec, MapContext, _no_gradient
from gradcam.targets import ClassRows, Rows, model_logits
from gradcam.targets.contrast import COMPARED, ContrastRows, ResidualSoftmaxRows


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
        return gradients.mean(dim=(-2, -1))


class GradCAMPlusPlus(CAM):
    r"""Grad-CAM++ (Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations
    for Deep Convolutional Networks", WACV 2018).

    With g = dS^c/dA^k_{ij} (S^c the pre-softmax score), the paper's closed form (eq. 19), valid for a
    piecewise-linear network after the layer, weights each position by

        a_{ij}^{kc} = g_{ij}^2 / ( 2 g_{ij}^2 + sum_{a,b} A^k_{ab} g_{ij}^3 )      (0 where g_{ij} = 0)
        w_k^c       = sum_{i,j} a_{ij}^{kc} ReLU(g_{ij})
        L^c         = ReLU( sum_k w_k^c A^k )

    The paper differentiates Y^c = exp(S^c), which multiplies every w_k^c of an image by exp(S^c): a
    positive per-image constant that the normalised map does not see and that overflows float32 for
    scores above ~88. Like the reference implementations, we leave it out, so ``raw`` is the paper's map
    divided by exp(S^c).
    """

    method = "gradcam++"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        squared = gradients.pow(2)
        denominator = 2 * squared + activations.sum(dim=(-2, -1), keepdim=True) * gradients.pow(3)
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(denominator != 0, squared / safe, torch.zeros_like(squared))
        return (alpha * torch.relu(gradients)).sum(dim=(-2, -1))


class XGradCAM(CAM):
    r"""XGrad-CAM (Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
    CNNs", BMVC 2020).

        alpha_k^c = sum_{i,j} ( A^k_{ij} / sum_{a,b} A^k_{ab} ) dS^c/dA^k_{ij}
        L^c       = ReLU( sum_k alpha_k^c A^k )

    A channel whose activations sum to zero gets weight zero (the paper leaves it undefined).
    """

    method = "xgradcam"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        total = activations.sum(dim=(-2, -1), keepdim=True)
        safe = torch.where(total != 0, total, torch.ones_like(total))
        share = torch.where(total != 0, activations / safe, torch.zeros_like(activations))
        return (share * gradients).sum(dim=(-2, -1))


class HiResCAM(CAM):
    r"""HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", 2020).

        L^c = ReLU( sum_k dS^c/dA^k  (element-wise *)  A^k )

    The gradient is not averaged over positions, so the map shows only locations the score used. The
    paper's explanation is the element-wise sum; as for Grad-CAM we keep its positive part, the evidence
    for the class.
    """

    method = "hirescam"

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return gradients * activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(self.weighted_activations(activations, gradients, context).sum(dim=-3))


class LayerCAM(CAM):
    r"""LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021).

        w^{kc}_{ij} = ReLU( dS^c/dA^k_{ij} )
        L^c         = ReLU( sum_k w^{kc}_{ij} A^k_{ij} )
    """

    method = "layercam"

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(gradients) * activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(self.weighted_activations(activations, gradients, context).sum(dim=-3))


class GradCAMElementWise(CAM):
    r"""Element-wise Grad-CAM (pytorch-grad-cam's ``GradCAMElementWise``): HiResCAM with each position's
    per-channel evidence clipped before the channels are summed.

        L^c = ReLU( sum_k ReLU( dS^c/dA^k_{ij} A^k_{ij} ) )

    Like HiResCAM it keeps the gradient's spatial detail instead of averaging it (Grad-CAM's alpha);
    unlike HiResCAM a channel that speaks against the class at a position cannot cancel another that
    speaks for it there. No paper defines it; it is the variant pytorch-grad-cam introduced.
    """

    method = "gradcam-elementwise"

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(gradients * activations)

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        return torch.relu(self.weighted_activations(activations, gradients, context).sum(dim=-3))


class FinerCAM(GradCAM):
    r"""Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR 2025): Grad-CAM of a class's score against the classes most like it.

        y = sum_j p_j (y^c - alpha y^j) / sum_j p_j          (j: the ``compared`` nearest logits)
        alpha_k = mean_{i,j} dy/dA^k_{ij},   L = ReLU( sum_k alpha_k A^k )

    (:class:`gradcam.targets.contrast.ContrastRows`). What c shares with its look-alikes cancels, so the
    map keeps the details that tell them apart; ``alpha=0`` is Grad-CAM. The classes explained are chosen
    as for every method (top-1, given indices, top-k); the compared classes are those with the nearest
    logits on the same forward.
    """

    method = "finercam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        alpha: float = 1.0,
        compared: Sequence[int] = COMPARED,
        counterfactual: bool = False,
        layout: LayoutSpec | Sequence[LayoutSpec] = None,
    ) -> None:
        super().__init__(model, layer, counterfactual=counterfactual, layout=layout)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise GradCAMError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha, self.compared = float(alpha), tuple(compared)

    def explain_rows(
        self, inputs: Inputs, choose: Chooser, *, eigen_smooth: bool = False, aug_smooth: bool = False
    ) -> list[Explanation]:
        def contrast(output: object) -> Rows:
            rows = choose(output)
            if type(rows) is not ClassRows:
                raise GradCAMError("finercam contrasts a classifier's classes; explain class indices")
            return ContrastRows(rows, model_logits(output, rows.batch), self.compared, self.alpha)

        return super().explain_rows(inputs, contrast, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)


class ShapleyCAM(GradCAM):
    r"""Shapley-CAM (Cai, "CAMs as Shapley Value-based Explainers", 2025): Grad-CAM's channel weights
    from a second-order Taylor view of the score, the gradient minus half the Hessian-vector product along
    the activations themselves,

        alpha_k = mean_{i,j} ( dy/dA^k_{ij} - 1/2 (H_A A)^k_{ij} ),   H_A A = d/dA <dy/dA, A>
        L = ReLU( sum_k alpha_k A^k )

    with y the residual softmax target of the explained class (``rest=True``,
    :class:`gradcam.targets.contrast.ResidualSoftmaxRows`, as the paper pairs them) or its logit
    (``rest=False``; behind a layer followed only by ReLUs, pooling and linear maps the logit's Hessian is
    zero and the map is Grad-CAM's). One double backward per target row.
    """

    method = "shapleycam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        rest: bool = True,
        counterfactual: bool = False,
        layout: LayoutSpec | Sequence[LayoutSpec] = None,
    ) -> None:
        super().__init__(model, layer, counterfactual=counterfactual, layout=layout)
        self.rest = bool(rest)

    def explain_rows(
        self, inputs: Inputs, choose: Chooser, *, eigen_smooth: bool = False, aug_smooth: bool = False
    ) -> list[Explanation]:
        def residual(output: object) -> Rows:
            rows = choose(output)
            if not self.rest:
                return rows
            if type(rows) is not ClassRows:
                raise GradCAMError(
                    "shapleycam's ReST target needs a classifier's classes; or pass rest=False"
                )
            return ResidualSoftmaxRows(rows)

        return super().explain_rows(inputs, residual, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)

    def _gradient_chunks(
        self, scores: torch.Tensor, activations: list[torch.Tensor], first: str, nothing: bool = False
    ) -> Iterator[tuple[slice, Sequence[torch.Tensor | None]]]:
        if nothing:
            yield from super()._gradient_chunks(scores, activations, first, nothing)
            return
        if not scores.requires_grad:
            raise GradCAMError(_no_gradient(first))
        for n in range(scores.shape[0]):
            grads = torch.autograd.grad(scores[n].sum(), activations, create_graph=True, allow_unused=True)
            second = []
            for grad, activation in zip(grads, activations, strict=True):
                if grad is None:
                    second.append(None)
                    continue
                hvp = None
                if grad.requires_grad:  # else the score is linear in A: no second-order term
                    (hvp,) = torch.autograd.grad(
                        grad, activation, activation.detach(), retain_graph=True, allow_unused=True
                    )
                term = grad.detach() if hvp is None else grad.detach() - 0.5 * hvp.detach()
                second.append(term[None])
            yield slice(n, n + 1), second
