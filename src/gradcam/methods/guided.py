r"""Guided Backpropagation and Guided Grad-CAM: pixel-level gradients, alone and times the Grad-CAM map.

Guided Backpropagation changes one rule of the backward pass: at every ReLU the gradient flows back only
where the ReLU's input was positive (the usual ReLU gradient) *and* the gradient arriving from above is
positive. The ReLUs are found by the functions they call, not by module type, so ReLUs written as
functions are guided as well as ``nn.ReLU`` modules (the peers hook the modules only and silently return
the plain gradient for a functional ReLU).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.layouts import LayoutSpec
from gradcam.methods.base import Chooser, LayerSpec, _check_device, _check_inputs, _check_not_inference
from gradcam.methods.gradient import GradCAM
from gradcam.targets import TargetSpec, model_logits, resolve
from gradcam.targets.rows import ClassRows, Scored

# A clipped ReLU read from a call's arguments: (input, upper bound or None, in place?), or None when the
# call is not a ReLU (a hardtanh whose lower bound is not 0).
_Clip = tuple[torch.Tensor, float | None, bool] | None


def _relu(input: torch.Tensor, inplace: bool = False) -> _Clip:
    return input, None, inplace


def _relu_(input: torch.Tensor) -> _Clip:
    return input, None, True


def _relu6(input: torch.Tensor, inplace: bool = False) -> _Clip:
    return input, 6.0, inplace


def _relu6_(input: torch.Tensor) -> _Clip:
    return input, 6.0, True


def _hardtanh(
    input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> _Clip:
    return (input, float(max_val), inplace) if min_val == 0 and max_val > 0 else None


def _hardtanh_(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0) -> _Clip:
    return _hardtanh(input, min_val, max_val, True)


# Every entry point of a (clipped) ReLU in PyTorch. nn.ReLU calls F.relu; nn.ReLU6 and nn.Hardtanh call
# F.hardtanh; F.relu_ is torch.relu_ and F.hardtanh_ is torch._C._nn.hardtanh_.
_RELUS: dict[Callable[..., Any], Callable[..., _Clip]] = {
    F.relu: _relu,
    torch.relu: _relu,
    torch.Tensor.relu: _relu,
    torch.relu_: _relu_,
    torch.Tensor.relu_: _relu_,
    F.relu6: _relu6,
    torch._C._nn.relu6: _relu6,
    torch._C._nn.relu6_: _relu6_,
    F.hardtanh: _hardtanh,
    torch._C._nn.hardtanh: _hardtanh,
    torch._C._nn.hardtanh_: _hardtanh_,
}


class _GuidedClip(torch.autograd.Function):
    """min(max(x, 0), hi) forward; backward passes relu(grad) where 0 < x < hi (hi=None: no upper bound)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hi: float | None) -> torch.Tensor:
        out = torch.relu(x) if hi is None else F.hardtanh(x, 0.0, hi)
        # Where the output lies strictly inside (0, hi) is where the input does.
        mask = out > 0 if hi is None else (out > 0) & (out < hi)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad.clamp_min(0) * mask, None


class _GuidedReLUs(TorchFunctionMode):
    """Reroutes every ReLU call made while active to :class:`_GuidedClip`; other calls run unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        parse = _RELUS.get(func)
        clip = parse(*args, **kwargs) if parse is not None else None
        if clip is None or not isinstance(clip[0], torch.Tensor) or not clip[0].is_floating_point():
            return func(*args, **kwargs)
        x, hi, inplace = clip
        out = _GuidedClip.apply(x, hi)
        # In place: the caller's tensor takes the result and its autograd history (views included).
        return x.copy_(out) if inplace else out


def _check_no_script(model: nn.Module) -> None:
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise GradCAMError(
            f"module '{scripted[0] or type(model).__name__}' is TorchScript; Guided Backprop cannot see the "
            "ReLUs inside it (it would silently return the plain gradient): pass the eager model"
        )


class GuidedBackprop:
    r"""Guided Backpropagation (Springenberg, Dosovitskiy, Brox and Riedmiller, "Striving for
    Simplicity: The All Convolutional Net", ICLR 2015 workshop track, arXiv:1412.6806).

    The gradient dy^c/dx of the pre-softmax target score y^c with respect to the input, computed with a
    modified backward rule at every ReLU f = relu(x): with R the gradient arriving from above,

        R_in = [x > 0] * relu(R_out)          (plain backprop: R_in = [x > 0] * R_out)

    so only positive gradient passes, and only where the ReLU was active. A clipped ReLU
    f = min(max(x, 0), m) (ReLU6, m = 6) passes relu(R_out) where 0 < x < m.

    Activations covered, however the model writes them: ``nn.ReLU`` (in-place too), ``nn.ReLU6`` and
    ``nn.Hardtanh(0, m)`` modules, and the calls ``torch.relu``, ``torch.relu_``, ``Tensor.relu``,
    ``Tensor.relu_``, ``F.relu`` (``inplace`` True or False), ``F.relu_``, ``F.relu6``,
    ``F.hardtanh(x, 0, m)`` and ``F.hardtanh_(x, 0, m)`` (m > 0). They are rerouted by a
    :class:`torch.overrides.TorchFunctionMode` that is active only during the call's forward pass. Every
    other operation keeps its plain gradient: SiLU/Swish, GELU, Hardswish, LeakyReLU, ELU, PReLU, ``clamp``,
    ``threshold`` and max-pooling are not guided. TorchScript modules are refused (their ReLUs cannot
    be seen).

    A call returns the guided gradients (B,C,H,W), detached, on the CPU, in the input's dtype. The model is
    left exactly as found: it runs in eval mode and every module's flag is restored, no hook is added,
    no parameter gradient is computed; the input tensor, its ``.grad`` and ``requires_grad`` are not
    touched. Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    Example:
        >>> guided = GuidedBackprop(model)(batch, targets=[281, 243])
    """

    method = "guided-backprop"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise GradCAMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def __call__(self, inputs: torch.Tensor, targets: TargetSpec = None) -> torch.Tensor:
        """Guided gradients (B,C,H,W) of each image's target score (None: its top-1 class)."""
        return self._explain(inputs, targets)[0]

    def _explain(self, inputs: torch.Tensor, targets: TargetSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided gradients (CPU) and the resolved class ids (B,)."""
        batch = len(inputs) if isinstance(inputs, torch.Tensor) else 0

        def choose(output: object) -> ClassRows:
            logits = model_logits(output, batch)
            return ClassRows(resolve(logits.detach(), targets)[None], batch)

        scored, grads = self.explain_rows(inputs, choose)
        return grads[0], scored.ids[0]

    def explain_rows(self, inputs: torch.Tensor, choose: Chooser) -> tuple[Scored, torch.Tensor]:
        """(the rows' :class:`~gradcam.targets.rows.Scored`, guided gradients (N,B,C,H,W)) from ONE guided
        forward.

        ``choose`` maps the model's output to the (N,B) rows to explain, as for
        :meth:`gradcam.methods.CAM.explain_rows`; the N rows are differentiated by one batched backward
        (row by row where an operation has no batching rule). Tensors come back detached, on the CPU.
        """
        inputs = _check_inputs(inputs)
        if not isinstance(inputs, torch.Tensor):
            raise GradCAMError(
                "guided backpropagation differentiates a batch tensor; a list of images has none"
            )
        _check_device(self.model, inputs)
        _check_not_inference(self.model)
        _check_no_script(self.model)
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model):
            x = inputs.detach().clone().requires_grad_(True)
            with _GuidedReLUs():
                # A clone, not the leaf: the model may rewrite its input in place (a leading in-place ReLU).
                output = self.model(x.clone())
            rows = choose(output)
            scores = rows.scores(output)
            if not scores.requires_grad:
                raise GradCAMError(
                    "no gradient reaches the input from the model output "
                    "(does the model run under torch.no_grad() or detach its input?)"
                )
            grads = _row_gradients(scores, x)
            scored = rows.scored(output, scores)
        return scored, grads.detach().cpu()


def _row_gradients(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,B,C,H,W) d scores[n, b] / dx_b for every row n of the (N,B) ``scores``."""
    rows = scores.shape[0]
    if rows == 1:
        (grads,) = torch.autograd.grad(scores.sum(), x)
        return grads[None]
    selector = torch.zeros(rows, *scores.shape, device=scores.device, dtype=scores.dtype)
    selector[torch.arange(rows), torch.arange(rows)] = 1.0
    try:
        (grads,) = torch.autograd.grad(scores, x, selector, retain_graph=True, is_grads_batched=True)
        return grads
    except RuntimeError:  # an operation without a batching rule: one backward per row
        return torch.stack([torch.autograd.grad(scores, x, row, retain_graph=True)[0] for row in selector])


def guided_gradcam(guided: torch.Tensor, maps: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Guided Grad-CAM: guided gradients (..., C, H, W) times the normalised Grad-CAM maps (..., H, W)
    at the input's size, broadcast over the channels (Selvaraju et al., ICCV 2017, section 3.1); for
    clips (``dims=3``) gradients (..., C, T, H, W) and maps (..., T, H, W). The one place the product is
    computed."""
    return guided * maps.unsqueeze(-dims - 1).to(guided.dtype)


class GuidedGradCAM:
    r"""Guided Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, section 3.1).

    The element-wise product of Guided Backpropagation and the Grad-CAM map upsampled to the input's
    size (bilinear), broadcast over the input channels:

        GuidedGradCAM^c = GuidedBackprop^c (B,C,H,W) * upsample(L^c)[:, None] (B,1,H,W)

    where upsample(L^c) is :attr:`gradcam.Explanation.maps` (each map divided by its maximum, a
    per-image positive scale). Targets are resolved once (None: each image's top-1 class) so both
    factors explain the same class. See :class:`GuidedBackprop` for the activations it guides.

    Args:
        model: a classifier returning pre-softmax scores (B, classes), left exactly as found.
        layer: the Grad-CAM layer: None (automatic), a qualified module name, or the module.
        layout: the layer's layout when it cannot be decided (see :class:`gradcam.GradCAM`).
    """

    method = "guided-gradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, layout: LayoutSpec = None) -> None:
        if isinstance(layer, Sequence) and not isinstance(layer, str):
            raise GradCAMError("GuidedGradCAM explains one layer; got a list of layers")
        self.guided = GuidedBackprop(model)
        self.cam = GradCAM(model, layer, layout=layout)

    def __call__(self, inputs: torch.Tensor, targets: TargetSpec = None) -> torch.Tensor:
        """Guided Grad-CAM (B,C,H,W), detached, on the CPU."""
        guided, ids = self.guided._explain(inputs, targets)
        explanation = self.cam(inputs, ids)  # the engine runs on its own copy of the inputs
        return guided_gradcam(guided, explanation.maps)
