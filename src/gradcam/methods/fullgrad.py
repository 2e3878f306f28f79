r"""FullGrad: the input-gradient and the bias-gradients of every layer, as one saliency map.

Srinivas and Fleuret, "Full-Gradient Representation for Neural Network Visualization", NeurIPS 2019
(arXiv:1905.00780). For a network f with biases b_l (every layer l), the *full-gradient decomposition*
(eq. 2 of the paper) writes a target score as

    f(x) = <grad_x f(x), x> + sum_l <grad_{b_l} f(x), b_l>,

exactly for a piecewise-linear network (ReLU, max pooling, convolutions, linear layers, batch norm in
eval mode). Here a layer's bias-gradient term is taken at each position of the layer's output z_l, as in
the paper: grad_{b_l} f ⊙ b_l is the (K,h,w) tensor dy/dz_l ⊙ b_l (b_l broadcast over positions), whose
sum is <dy/db_l, b_l>. A batch norm in eval mode, z = gamma (a - mu) / sqrt(var + eps) + beta, is affine
with the effective bias beta - mu gamma / sqrt(var + eps) (gamma = 1, beta = 0 without affine
parameters); a batch norm without running statistics normalises by the batch's and has no fixed bias.
The map (the paper's eq. 5) is

    S^c(x) = psi(grad_x y^c ⊙ x) + sum_{l spatial} sum_k psi(dy^c/dz_l ⊙ b_l)_k,

with psi = absolute value, then each (image, channel) rescaled to [0, 1] (t - min t, divided by
1e-7 + its maximum), then bilinear upsampling (align_corners=False) to the input's (H, W); the input
term's channels are summed too. "Spatial" layers are the convolutions and batch norms whose output is a
(B,K,h,w) feature map; the linear layers' biases belong to the decomposition but have no position, so
they are not in the map (as in the paper and pytorch-grad-cam).

This is pytorch-grad-cam's ``FullGrad`` post-processing (per-channel min-max, the channels and terms
summed); the sum over channels is taken before the upsampling, which is the same map (upsampling is
linear) at a fraction of the memory. pytorch-grad-cam resizes with OpenCV and keeps only exact
``Conv2d``/``BatchNorm2d`` types with an affine bias; here any convolution or batch norm with a bias
(an effective one for batch norm) counts. The reference implementation (Srinivas' fullgrad-saliency)
rescales each term over all its channels at once and upsamples with align_corners=True instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation, upsample
from gradcam.methods.base import (
    Chooser,
    WholeModelCAM,
    _call_chooser,
    _check_device,
    _check_inputs,
    _check_not_inference,
    row_explanation,
)
from gradcam.targets import TargetSpec
from gradcam.targets.rows import Rows

#: pytorch-grad-cam's (and OpenCV-free) rescaling: (t - min) / (EPS + max(t - min)).
EPS = 1e-7


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias b (K,) a layer adds to its output, or None: a convolution's or linear layer's bias; a batch
    norm's beta - running_mean * gamma / sqrt(running_var + eps) (eval mode); None for a layer without
    one (or a batch norm without running statistics)."""
    with torch.no_grad():
        if isinstance(module, _BatchNorm):
            mean, var = module.running_mean, module.running_var
            if mean is None or var is None:
                return None
            scale = torch.rsqrt(var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            shift = module.bias if module.bias is not None else torch.zeros_like(mean)
            return (shift - mean * scale).detach()
        if isinstance(module, (_ConvNd, nn.Linear)) and module.bias is not None:
            return module.bias.detach()
    return None


@dataclass(frozen=True)
class _Call:
    """One call of a biased layer in the forward: its output z (as the layer produced it) and its bias
    shaped to broadcast over z."""

    name: str
    output: torch.Tensor
    bias: torch.Tensor
    spatial: bool


@dataclass(frozen=True)
class _Forward:
    x: torch.Tensor
    output: object
    rows: Rows
    scores: torch.Tensor
    calls: list[_Call]


@dataclass(frozen=True)
class FullGradient:
    """The full-gradient decomposition of one target score per image (eq. 2 of the paper).

    Attributes:
        scores: (B,) the target scores y.
        input: (B,C,H,W) grad_x y ⊙ x.
        biases: per call of a biased layer (in forward order): its name and dy/dz ⊙ b, the shape of the
            layer's output z.
    """

    scores: torch.Tensor
    input: torch.Tensor
    biases: tuple[tuple[str, torch.Tensor], ...]

    def total(self) -> torch.Tensor:
        """(B,) the sum of every term: equals ``scores`` for a piecewise-linear network."""
        total = self.input.flatten(1).sum(1)
        for _, term in self.biases:
            total = total + term.flatten(1).sum(1)
        return total


def _biased_layers(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    found = []
    for name, module in model.named_modules():
        bias = effective_bias(module)
        if bias is not None:
            found.append((name, module, bias))
    return found


def _shaped(module: nn.Module, bias: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The bias broadcast over the output: along dim 1 for convolutions and batch norms, the last dim for
    linear layers."""
    if isinstance(module, nn.Linear):
        return bias
    return bias.reshape(-1, *([1] * (output.dim() - 2)))


@contextmanager
def _biased_calls(model: nn.Module) -> Iterator[list[_Call]]:
    """Hook every biased layer for the block (removed on exit, also on error); each call appends its
    output, and the forward continues on a clone, so that a following in-place operation (ReLU) cannot
    rewrite the tensor we differentiate."""
    calls: list[_Call] = []
    handles = []

    def hook_for(name: str, bias: torch.Tensor):
        def hook(module: nn.Module, args: object, output: object) -> object:
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            spatial = not isinstance(module, nn.Linear) and output.dim() == 4
            shaped = _shaped(module, bias.to(output.dtype), output)
            calls.append(_Call(name, output, shaped, spatial))
            return output.clone()

        return hook

    try:
        for name, module, bias in _biased_layers(model):
            handles.append(module.register_forward_hook(hook_for(name, bias)))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def rescale(terms: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of ``terms`` (..., h, w) shifted to minimum 0 and divided by 1e-7 plus its maximum."""
    low = terms.flatten(-2).amin(-1)[..., None, None]
    shifted = terms - low
    high = shifted.flatten(-2).amax(-1)[..., None, None]
    return shifted / (high + EPS)


def _terms_map(x: torch.Tensor, grads: Sequence[torch.Tensor | None], calls: Sequence[_Call]) -> torch.Tensor:
    """(n,B,H,W) S = psi(dy/dx ⊙ x) summed over channels plus, per spatial call, the upsampled channel sum
    of psi(dy/dz ⊙ b), for gradients (n, ...) of n target rows."""
    size = (x.shape[-2], x.shape[-1])
    total = rescale((grads[0].float() * x.detach().float()).abs()).sum(-3)
    for grad, call in zip(grads[1:], calls, strict=True):
        if grad is None:  # this call does not reach the score (an unused branch): psi(0) = 0
            continue
        term = rescale((grad.float() * call.bias.float()).abs()).sum(-3)
        total = total + upsample(term, size)
    return total


def _describe(calls: Sequence[_Call]) -> str:
    names = list(dict.fromkeys(call.name for call in calls if call.spatial))
    if not names:
        return "fullgrad: input"
    return f"fullgrad: input + {names[0]}..{names[-1]} ({len(names)} biased layers)"


_NO_GRADIENT = (
    "no gradient reaches the input from the model output "
    "(does the model run under torch.no_grad() or detach its input?)"
)


class FullGrad(WholeModelCAM):
    r"""FullGrad (Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization",
    NeurIPS 2019).

    With y^c the target's pre-softmax score, z_l the output of biased layer l and b_l its bias (a batch
    norm's effective bias beta - mu gamma / sqrt(var + eps)):

        S^c(x) = psi(grad_x y^c ⊙ x) + sum_l sum_k psi(dy^c/dz_l ⊙ b_l)_k

    psi = |.|, each (image, channel) min-max rescaled to [0, 1], bilinearly upsampled to the input; the
    sum runs over the convolutions and batch norms with (B,K,h,w) outputs (see the module docstring for
    the decomposition it comes from and the differences to pytorch-grad-cam). ``raw`` is S^c at the
    input's resolution (B,H,W), not normalised; ``layer`` names the layers summed.

    Not a one-layer CAM: ``layer`` must be None (every biased layer is used). The call signature,
    targets, rows and :class:`~gradcam.Explanation` are those of every CAM method; several targets per
    image come from ONE forward and a batched backward. The model is left exactly as found (train/eval
    flags, hooks, ``requires_grad``, ``.grad``: no parameter gradient is computed), also on error.
    ``counterfactual`` is refused: |(-g) ⊙ b| = |g ⊙ b|, the map would not change.

    Example:
        >>> explanation = FullGrad(resnet)(batch, targets=[281, 243])   # raw (2, H, W)
        >>> FullGrad(resnet).decompose(batch).total()                    # = the scores (ReLU networks)
    """

    method = "fullgrad"
    reads = "the input and every biased layer of the model"
    why_no_counterfactual = "takes absolute values, so its counterfactual map is the map itself"
    why_no_layout = "reads convolution and batch-norm outputs as they are; layout does not apply"

    def explain_rows(
        self,
        inputs: torch.Tensor,
        choose: Chooser,
        *,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Explanation]:
        """One (N,B) Explanation of ``inputs`` (B,C,H,W) whose ``raw`` is S^c at the input's resolution;
        the CAM call (:meth:`CAM.__call__`) gives targets and shapes as for every method."""
        if eigen_smooth:
            raise GradCAMError("eigen_smooth applies to one layer's channels; fullgrad sums every layer")
        if aug_smooth:
            raise GradCAMError("aug_smooth is not available for fullgrad; explain the image as is")
        inputs = self._checked(inputs)
        with self._forward(inputs, choose) as run:
            spatial = [call for call in run.calls if call.spatial]
            roots = [run.x, *(call.output for call in spatial)]
            nothing = not any(run.rows.wanted)
            chunks = [
                _terms_map(run.x, grads, spatial)
                for _, grads in self._gradient_chunks(run.scores, roots, "input", nothing)
            ]
            scored = run.rows.scored(run.output, run.scores)
        size = (inputs.shape[2], inputs.shape[3])
        return [row_explanation(torch.cat(chunks), scored, _describe(spatial), self.method, size)]

    def decompose(self, inputs: torch.Tensor, targets: TargetSpec = None) -> FullGradient:
        """The full-gradient decomposition (eq. 2) of one target per image (None: its top-1 class; an
        int, B ints or a target function, as for :meth:`CAM.__call__`), every biased layer included
        (linear layers too), detached, on the CPU, in the input's dtype."""
        choose, single = _call_chooser(targets, None, len(inputs))
        if not single:
            raise GradCAMError("decompose explains one target per image; give an int, B ints or a function")
        inputs = self._checked(inputs)
        with self._forward(inputs, choose) as run:
            roots = [run.x, *(call.output for call in run.calls)]
            grads = torch.autograd.grad(run.scores[0].sum(), roots, allow_unused=True)
            products = [
                torch.zeros_like(root) if grad is None else grad * factor
                for root, grad, factor in zip(
                    roots, grads, [run.x, *(c.bias for c in run.calls)], strict=True
                )
            ]
            return FullGradient(
                scores=run.scores[0].detach().cpu(),
                input=products[0].detach().cpu(),
                biases=tuple(
                    (call.name, term.detach().cpu())
                    for call, term in zip(run.calls, products[1:], strict=True)
                ),
            )

    def _checked(self, inputs: object) -> torch.Tensor:
        inputs = _check_inputs(inputs)
        if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 4):
            raise GradCAMError(
                "fullgrad explains a (B,C,H,W) batch of images (not clips or a detector's list)"
            )
        _check_device(self.model, inputs)
        _check_not_inference(self.model)
        return inputs

    @contextmanager
    def _forward(self, inputs: torch.Tensor, choose: Chooser) -> Iterator[_Forward]:
        """One forward of a copy of ``inputs`` that requires grad, every biased layer's output kept, in
        eval mode with gradients recorded; the model's flags and hooks are restored on exit."""
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model):
            x = inputs.detach().clone().requires_grad_(True)
            with _biased_calls(self.model) as calls:
                # A clone, not the leaf: the model may rewrite its input in place (a leading in-place ReLU).
                output = self.model(x.clone())
            rows = choose(output)
            scores = rows.scores(output)
            if not scores.requires_grad:
                raise GradCAMError(_NO_GRADIENT)
            yield _Forward(x, output, rows, scores, calls)
