"""Call-scoped capture of layer activations with a head-only autograd graph.

One forward pass runs with gradient recording switched off until the first target layer has produced
its output. That output becomes a fresh leaf tensor ``A`` that requires grad, and recording is switched
on from there, so the autograd graph covers only the network *after* the target layer(s) and no
parameter gradient is ever computed. The forward then continues on a *clone* of ``A``: a following
in-place operation (``nn.ReLU(inplace=True)``, ``F.relu_``) rewrites the clone, never the activation we
keep, which stays exactly the layer's output as the layer produced it.

Everything the call touches on the user's model is restored on exit, also when the forward raises:
each module's train/eval flag (the forward runs in eval mode), and the hooks, which live only for the
one hooked forward. Parameters' ``requires_grad`` and ``.grad`` are never touched.

With several layers, a layer downstream of an earlier captured one stays in that graph (its gradient
flows back through it); a layer on a parallel branch becomes a root of its own when nothing recorded
leads to it (frozen models), else the graph also covers its branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.explanation import Placement


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
    return names


def resolve_module(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(qualified name, module)`` for a layer given by name or as a module of ``model``."""
    if isinstance(layer, nn.Module):
        name = _module_names(model).get(layer)
        if name is None:
            raise GradCAMError(f"layer {type(layer).__name__} is not a submodule of the model")
        return name, layer
    if not isinstance(layer, str):
        raise GradCAMError(f"layer must be a module name or an nn.Module, got {type(layer).__name__}")
    if layer:
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            pass
    candidates = [n for n, m in model.named_modules() if n and not isinstance(m, nn.ModuleList)]
    shown = ", ".join(candidates[-8:][::-1])
    more = " ..." if len(candidates) > 8 else ""
    raise GradCAMError(f"layer '{layer}' not found; candidates (last first): {shown}{more}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode for the block, then restore each module's own flag.

    Only modules in training mode are touched, so a model already in eval mode costs nothing.
    """
    training = [module for module in model.modules() if module.training]
    try:
        for module in training:
            module.training = False
        yield
    finally:
        for module in training:
            module.training = True


Runner = Callable[[torch.Tensor], object]


@dataclass
class Capture:
    """What one forward pass captured: the layers' activations (graph roots) and the model output."""

    names: list[str]
    activations: list[torch.Tensor | None] = field(default_factory=list)
    output: torch.Tensor | None = None


def _check_activation(name: str, output: object) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        got = type(output).__name__ if not isinstance(output, torch.Tensor) else f"a {output.dtype} tensor"
        raise GradCAMError(
            f"layer '{name}' returns {got}; expected a float tensor ((B,C,h,w), (B,h,w,C) or tokens (B,N,D))"
        )
    return output


def _graph_copy(activation: torch.Tensor) -> torch.Tensor:
    """The tensor kept as a layer's activation: a copy of the layer's output in the head-only graph."""
    if not activation.requires_grad:
        # A root of the head-only graph: the first captured layer (nothing before it was recorded), or a
        # later one on a branch that no captured layer feeds.
        return activation.detach().clone().requires_grad_(True)
    return activation.clone()


def _check_forward(names: list[str], calls: list[int], produced: list[tuple[str, torch.Tensor, int]]) -> None:
    """Refuse a hooked forward whose captured outputs were rewritten in place afterwards, or in which a
    captured layer did not run."""
    for name, tensor, version in produced:
        if tensor._version != version:
            # The model rewrote the layer's output in place through another reference to it (a layer that
            # returns its input, say). The forward went on with a copy, so the scores would not be the
            # model's: refuse rather than explain another function.
            raise GradCAMError(
                f"layer '{name}': its output is modified in place later in the forward through "
                "another reference; choose the layer after that in-place operation"
            )
    missing = [n for n, c in zip(names, calls, strict=True) if c == 0]
    if missing:
        raise GradCAMError(
            f"layer '{missing[0]}' did not run during the forward pass; choose a module that the model calls"
        )


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], *, graph: bool = True
) -> Iterator[tuple[Capture, Runner]]:
    """Hook ``layers`` for one forward pass (``graph=False``: record no graph at all, for the
    gradient-free methods).

    Yields ``(capture, run)``: call ``run(inputs)`` once inside the block; it returns the model output
    with the autograd graph rooted at the first captured layer, and removes the hooks as soon as that
    forward ends (further forwards in the block run unhooked). Inside the block the caller may compute
    ``torch.autograd.grad(score, capture.activations)``. On exit hooks are removed and the model's
    train/eval flags and the caller's grad mode are restored.
    """
    result = Capture(names=[name for name, _ in layers])
    result.activations = [None] * len(layers)
    calls = [0] * len(layers)
    produced: list[tuple[str, torch.Tensor, int]] = []
    graph_started = False
    handles = []

    def make_hook(index: int, name: str):
        def hook(module: nn.Module, args: object, output: object) -> torch.Tensor:
            nonlocal graph_started
            calls[index] += 1
            if calls[index] > 1:
                raise GradCAMError(
                    f"layer '{name}' runs more than once per forward (a shared module); "
                    "its activation is ambiguous: choose a module that runs once"
                )
            activation = _check_activation(name, output)
            produced.append((name, activation, activation._version))
            activation = _graph_copy(activation) if graph else activation.detach().clone()
            if graph and not graph_started:
                torch.set_grad_enabled(True)
                graph_started = True
            # Kept apart from what the forward continues with, and copied from the layer's output: an
            # in-place operation later in the forward (on the output or on a tensor it aliases) cannot
            # rewrite the activation we explain.
            result.activations[index] = activation
            return activation.clone()

        return hook

    def run(inputs: torch.Tensor) -> object:
        try:
            with torch.no_grad():
                output = model(inputs)
        finally:
            # One forward is all the hooks are for: later forwards in the block (Score-CAM's) run clean.
            for handle in handles:
                handle.remove()
        _check_forward(result.names, calls, produced)
        result.output = output
        return output

    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), eval_mode(model):
        try:
            for index, (name, module) in enumerate(layers):
                handles.append(module.register_forward_hook(make_hook(index, name)))
            yield result, run
        finally:
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(grad_mode)


@contextmanager
def detector_canvas(model: nn.Module, inputs: object) -> Iterator[Callable[[], Placement | None]]:
    """For a list of images, hook the detector's ``GeneralizedRCNNTransform`` for the block and yield a
    function giving the :class:`~gradcam.explanation.Placement` its forward saw (None for a tensor
    batch). A list of images for a model without that transform is refused: nothing would say where
    each image lies on the layers' grid. The hook is removed on exit, also on error."""
    if isinstance(inputs, torch.Tensor):
        yield lambda: None
        return
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transforms = [m for m in model.modules() if isinstance(m, GeneralizedRCNNTransform)]
    if len(transforms) != 1:
        raise GradCAMError(
            f"inputs are a list of images, but {type(model).__name__} has no torchvision detection "
            "transform (GeneralizedRCNNTransform) to say where each lands on the layers' grid; pass a "
            "(B,C,H,W) batch"
        )
    seen: list[Placement] = []
    sizes = tuple((int(image.shape[-2]), int(image.shape[-1])) for image in inputs)  # type: ignore[union-attr]

    def hook(module: nn.Module, args: object, output: object) -> None:
        images = output[0]  # (ImageList, targets)
        canvas = (int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))
        placed = tuple((int(h), int(w)) for h, w in images.image_sizes)
        seen.append(Placement(canvas, placed, sizes))

    handle = transforms[0].register_forward_hook(hook)
    try:
        yield lambda: seen[0] if seen else None
    finally:
        handle.remove()
