"""The engine every CAM method shares: layers, capture, targets, maps, Explanation.

A method subclasses :class:`CAM` and overrides one small function: :meth:`CAM.channel_weights`, which
turns a layer's activations A (B,K,h,w) and gradients G = dy^c/dA into channel weights alpha (B,K)
(the base class then computes L^c = ReLU(sum_k alpha_k^c A^k)), or :meth:`CAM.layer_map` for methods
whose map is not a weighted sum of channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from gradcam import layers as _layers
from gradcam import layouts
from gradcam.attention import attention_modules, inside_attention
from gradcam.capture import capture, detector_canvas, eval_mode, resolve_module
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation, Placement, upsample
from gradcam.layouts import Layout, LayoutSpec
from gradcam.methods.pca import first_component
from gradcam.targets import TargetSpec, model_logits, resolve
from gradcam.targets.rows import ClassRows, Rows, Scored, TargetRows

LayerSpec = str | nn.Module | None
LayersSpec = LayerSpec | Sequence[str | nn.Module]
#: What a model explains: a batch (B,C,H,W), a batch of clips (B,C,T,H,W), or a detector's list of
#: (C,H,W) images of their own sizes.
Inputs = torch.Tensor | Sequence[torch.Tensor]
#: How the engine is told what to explain: the forward's output -> the (N,B) rows of targets.
Chooser = Callable[[object], Rows]

_SHAPES = "a float tensor (B,C,H,W) or (B,C,T,H,W), or a list of float (C,H,W) images (detectors)"


def _check_inputs(inputs: object) -> Inputs:
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise GradCAMError("inputs must hold at least one image, got an empty list")
        for index, image in enumerate(inputs):
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
                got = (
                    f"shape {tuple(image.shape)} {image.dtype}"
                    if isinstance(image, torch.Tensor)
                    else type(image).__name__
                )
                raise GradCAMError(f"inputs[{index}] must be a float (C,H,W) image, got {got}")
        return list(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise GradCAMError(f"inputs must be {_SHAPES}, got {type(inputs).__name__}")
    if inputs.dim() not in (4, 5):
        raise GradCAMError(f"inputs must be {_SHAPES}, got shape {tuple(inputs.shape)}")
    if not inputs.dtype.is_floating_point:
        raise GradCAMError(f"inputs must be {_SHAPES}, got dtype {inputs.dtype}")
    if inputs.shape[0] == 0:
        raise GradCAMError("inputs must hold at least one image, got an empty batch")
    return inputs


def _first(inputs: Inputs) -> torch.Tensor:
    return inputs if isinstance(inputs, torch.Tensor) else inputs[0]


def _copy(inputs: Inputs) -> Inputs:
    """A copy: a model whose first operation is in place must not rewrite the caller's tensor."""
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().clone()
    return [image.detach().clone() for image in inputs]


def _input_size(inputs: Inputs) -> tuple[int, ...] | None:
    """(H, W) of a batch, (T, H, W) of clips, None for a list of images of their own sizes."""
    return tuple(inputs.shape[2:]) if isinstance(inputs, torch.Tensor) else None


def _check_device(model: nn.Module, inputs: Inputs) -> None:
    inputs = _first(inputs)
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


@dataclass(frozen=True)
class MapContext:
    """What a method may need beyond A and G: the model, the batch and the explained classes; the
    layer's layout and its output as the layer produced it (methods that feed it back into the model)."""

    model: nn.Module
    inputs: Inputs
    targets: torch.Tensor
    logits: torch.Tensor | None
    layer: str
    module: nn.Module
    layout: Layout = field(default_factory=Layout.channels_first)
    output: torch.Tensor | None = None
    #: the chosen targets: ``rows.image_scores(b, output)`` scores perturbed copies of image b
    rows: Rows | None = None
    #: (N,B) the rows' scores on the explained forward, detached
    scores: torch.Tensor | None = None


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
        layout: how to read the layer's output as (B,C,h,w) when it cannot be decided from the model
            (see :mod:`gradcam.layouts`): a :class:`~gradcam.layouts.Layout`, ``"channels-first"``,
            ``"channels-last"``, ``"tokens"``, ``"tokens:14x14+1"`` (grid and prefix tokens), or a
            callable (B, ...) -> (B,C,h,w) like pytorch-grad-cam's ``reshape_transform``, applied to
            the activations and, identically, to their gradients. One for all layers, or a list with one
            per layer. None (default): decided from the model and the input, or refused in one line.
    """

    method = "cam"
    uses_gradients = True
    #: False for methods whose map ignores the class (Eigen-CAM): computed once for all targets.
    class_specific = True
    #: False for methods that read the whole model rather than one layer (the attention methods).
    explains_layer = True
    #: True for gradient-free methods whose ``layer_map`` takes every target row at once (context.targets
    #: (n,B), map (n,B,h,w)), so that its perturbed forwards are shared by all targets (Score-CAM).
    maps_all_rows = False

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        counterfactual: bool = False,
        layout: LayoutSpec | Sequence[LayoutSpec] = None,
    ) -> None:
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
        self._explicit_layouts = _layout_list(layout, len(specs))
        self._facts: layouts.ModelFacts | None = None
        self._attention: list[str] | None = None

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights alpha (..., K) from activations A (B,K,h,w) and gradients G (..., B,K,h,w).

        Written with negative dimensions, so that G may carry a leading dimension of several targets.
        """
        raise NotImplementedError

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        """The per-channel terms (..., K, h, w) whose channel sum is the map before its ReLU."""
        return self.channel_weights(activations, gradients)[..., None, None] * activations

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        """The raw (..., h, w) map of one layer; by default ReLU(sum_k alpha_k A^k)."""
        weights = self.channel_weights(activations, gradients)
        return torch.relu(torch.einsum("...k,...khw->...hw", weights, activations))

    def _layouts(
        self,
        layers: list[tuple[str, nn.Module]],
        activations: list[torch.Tensor],
        size: tuple[int, int],
        batch: int,
    ) -> list[Layout]:
        """Each captured activation's layout (see :mod:`gradcam.layouts`), or a one-line refusal."""
        if self._facts is None:
            self._facts = layouts.model_facts(self.model)
            self._attention = attention_modules(self.model)
        return [
            layouts.decide(
                self.model,
                name,
                module,
                tuple(activation.shape),
                size,
                explicit=explicit,
                inside_attention=inside_attention(name, self._attention or []),
                facts=self._facts,
                batch=batch,
            )
            for (name, module), activation, explicit in zip(
                layers, activations, self._explicit_layouts, strict=True
            )
        ]

    def _resolved_layers(self, inputs: Inputs) -> list[tuple[str, nn.Module]]:
        if self._layers != [None]:
            return self._layers  # type: ignore[return-value]
        stage = _layers.backbone_stage(self.model)
        if stage is not None:
            return [resolve_module(self.model, stage)]
        if not isinstance(inputs, torch.Tensor):
            raise GradCAMError(
                f"{type(self.model).__name__} has no detector backbone to take the layer from; pass layer="
            )
        # The automatic choice costs one forward; it depends only on the architecture and the
        # per-image input shape, so it is remembered for inputs of the same shape.
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._auto:
            name = _layers.find_layer(self.model, inputs[:1])
            self._auto[key] = resolve_module(self.model, name)
        return [self._auto[key]]

    def __call__(
        self,
        inputs: Inputs,
        targets: TargetSpec | str | Callable | Sequence[Callable] = None,
        *,
        topk: int | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> Explanation | list[Explanation]:
        """Explain ``inputs``: a batch (B,C,H,W), clips (B,C,T,H,W) (maps (B,t,h,w) on the layer's grid,
        ``maps`` (B,T,H,W)) or a detector's list of (C,H,W) images (maps on each image's own pixels).

        Args:
            targets: None (each image's top-1 class), an int, B ints, ``"all"`` (every class: the
                result has a leading dimension of N = classes) or an (N,B) integer tensor; or a target
                function output -> (B,) scores (:mod:`gradcam.targets`: ``Segmentation``, ``Box``,
                ``Similarity``, ``Sigmoid``, ``Regression``, any callable), a list of them (N = its
                length), or a chooser of rows such as ``Detections(min_score=0.5)`` (N,B).
            topk: explain each image's k best classes instead (leading dimension N = k).
            eigen_smooth: replace the map by the first principal component of the weighted activations
                (the per-channel terms whose sum is the map), as pytorch-grad-cam's option.
            aug_smooth: average over test-time augmentation: the image and its horizontal mirror at
                scales 1 and 1.25; each map is mapped back to the original geometry (resized to the
                layer's grid of the original input, mirrored back) before averaging.

        Returns:
            One :class:`~gradcam.Explanation` for a CAM of one layer; for a CAM built with a list of
            layers, a list with one per layer in that order (the type is fixed when the CAM is built,
            never by the call). Its leading shape follows the one rule of :class:`~gradcam.Explanation`:
            (B,) for one class per image, (N,B) for several.

        All targets come from ONE forward pass; several targets per image are differentiated in chunks
        with one batched backward each (``torch.autograd.grad(..., is_grads_batched=True)``).
        """
        choose, single = _call_chooser(targets, topk, len(inputs))
        results = self.explain_rows(inputs, choose, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)
        if single:
            results = [_one_per_image(e) for e in results]
        return results if self._multi else results[0]

    def explain_rows(
        self,
        inputs: Inputs,
        choose: Chooser,
        *,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Explanation]:
        """One (N,B) Explanation per layer of ``inputs`` (see :meth:`__call__`), from one forward pass.

        ``choose`` maps the model's output to the (N,B) :class:`~gradcam.targets.rows.Rows` to explain
        (row n: every image's n-th target); it is how :func:`gradcam.pipeline.explain` asks for
        per-image classes (or detections) in the same forward that predicts them.
        """
        inputs = _check_inputs(inputs)
        _check_device(self.model, inputs)
        _check_not_inference(self.model)
        layers = self._resolved_layers(inputs)
        if aug_smooth:
            if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 4):
                raise GradCAMError(
                    "aug_smooth rescales and mirrors (B,C,H,W) images; explain these without it"
                )
            return self._augmented(inputs, choose, eigen_smooth, layers)
        return self._explain(inputs, choose, eigen_smooth, layers)

    def _explain(
        self,
        inputs: Inputs,
        choose: Chooser,
        eigen_smooth: bool,
        layers: list[tuple[str, nn.Module]],
    ) -> list[Explanation]:
        batch = len(inputs)
        with torch.inference_mode(False), eval_mode(self.model):
            x = _copy(inputs)
            hooked = capture(self.model, layers, graph=self.uses_gradients)
            with hooked as (captured, run), detector_canvas(self.model, x) as placed:
                output = run(x)
                rows = choose(output)
                placement = placed()
                activations = captured.activations
                grid = placement.canvas if placement is not None else tuple(_first(x).shape[-2:])
                found = self._layouts(layers, activations, grid, batch)
                scores = rows.scores(output)  # (N, B), differentiable
                raws = self._raw_maps(x, rows, output, scores, activations, layers, found, eigen_smooth)
                scored = rows.scored(output, scores)
        size = None if placement is not None else _input_size(inputs)
        return [
            row_explanation(layout.unfold(raw), scored, name, self.method, size, placement)
            for (name, _), raw, layout in zip(layers, raws, found, strict=True)
        ]

    def _raw_maps(
        self,
        x: Inputs,
        rows: Rows,
        output: object,
        scores: torch.Tensor,
        activations: list[torch.Tensor],
        layers: list[tuple[str, nn.Module]],
        found: list[Layout],
        eigen_smooth: bool,
    ) -> list[torch.Tensor]:
        """(N, B, h, w) raw maps per layer, gradients taken in chunks of target rows.

        Gradients are taken with respect to each layer's output as the layer produced it, then read as
        feature maps by the same re-indexing as the activations (an exact layout change, no arithmetic).
        """
        ids = rows.ids.to(activations[0].device)
        logits = rows.logits(output)
        logits = None if logits is None else logits.detach()
        contexts = [
            MapContext(self.model, x, ids, logits, n, m, layout, a.detach(), rows, scores.detach())
            for (n, m), layout, a in zip(layers, found, activations, strict=True)
        ]
        detached = [layout.feature_map(a.detach()) for layout, a in zip(found, activations, strict=True)]
        per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
        nothing = not any(rows.wanted)  # a detector found nothing to explain in any image: zero maps
        for rows, grads in self._gradient_chunks(scores, activations, layers[0][0], nothing):
            for index, (activation, grad, context) in enumerate(zip(detached, grads, contexts, strict=True)):
                if self.uses_gradients and grad is None:
                    raise GradCAMError(_no_gradient(layers[index][0]))
                if grad is not None:
                    grad = context.layout.feature_map(grad, leading=1)
                    if self.counterfactual:
                        grad = -grad
                per_layer[index].append(self._chunk_map(activation, grad, context, rows, eigen_smooth))
        return [torch.cat(chunks).float() for chunks in per_layer]

    def _chunk_map(
        self,
        activation: torch.Tensor,
        grad: torch.Tensor | None,
        context: MapContext,
        rows: slice,
        eigen_smooth: bool,
    ) -> torch.Tensor:
        def one(gradients: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
            row_context = replace(context, targets=targets)
            if eigen_smooth:
                weighted = self.weighted_activations(activation, gradients, row_context)
                return torch.relu(first_component(weighted, center=True))
            return self.layer_map(activation, gradients, row_context)

        ids = context.targets[rows]
        if grad is not None:
            return one(grad, ids)  # every row at once: G carries the leading (n,) dimension
        if not self.class_specific:
            return one(None, ids[0])[None].expand(len(ids), *activation.shape[:1], *activation.shape[2:])
        if self.maps_all_rows:
            return one(None, ids)  # the method scores every row from one set of perturbed forwards
        return torch.stack([one(None, row) for row in ids])

    def _gradient_chunks(
        self, scores: torch.Tensor, activations: list[torch.Tensor], first: str, nothing: bool = False
    ) -> Iterator[tuple[slice, Sequence[torch.Tensor | None]]]:
        """d scores[n] / d activations for the (N,B) ``scores``, row by row in chunks: one batched
        backward per chunk (each row's images are independent, so row n's gradient for image b is
        d scores[n, b] / dA_b). ``nothing``: no row is any image's own, the gradients are zero."""
        rows = scores.shape[0]
        if not self.uses_gradients:
            yield slice(0, rows), [None] * len(activations)
            return
        if nothing:
            yield slice(0, rows), [torch.zeros_like(a).expand(rows, *a.shape) for a in activations]
            return
        if not scores.requires_grad:
            raise GradCAMError(_no_gradient(first))
        if rows == 1:
            grads = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
            yield slice(0, 1), [None if g is None else g[None] for g in grads]
            return
        per_row = sum(a[0].numel() for a in activations) * scores.shape[1]
        chunk = max(1, GRADIENT_CHUNK_ELEMENTS // per_row)
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            selector = torch.zeros(count, *scores.shape, device=scores.device, dtype=scores.dtype)
            selector[torch.arange(count), torch.arange(start, start + count)] = 1.0
            yield slice(start, start + count), _batched_grad(scores, activations, selector)

    def _augmented(
        self,
        inputs: torch.Tensor,
        choose: Chooser,
        eigen_smooth: bool,
        layers: list[tuple[str, nn.Module]],
    ) -> list[Explanation]:
        chosen: list[Rows] = []

        def remember(output: object) -> Rows:
            chosen.append(choose(output))
            return chosen[-1]

        original = self._explain(inputs, remember, eigen_smooth, layers)
        # Every augmented pass explains the targets chosen on the original image.
        fixed = chosen[0]
        totals = [e.raw.clone() for e in original]
        passes = 1
        for flip in (False, True):
            for scale in AUGMENT_SCALES:
                if not flip and scale == 1.0:
                    continue
                augmented = _augment(inputs, flip, scale)
                explained = self._explain_augmented(augmented, fixed, eigen_smooth, layers, scale)
                for total, e in zip(totals, explained, strict=True):
                    back = upsample(e.raw, tuple(total.shape[-2:]))
                    total += back.flip(-1) if flip else back
                passes += 1
        return [replace(e, raw=total / passes) for e, total in zip(original, totals, strict=True)]

    def _explain_augmented(
        self,
        augmented: torch.Tensor,
        fixed: Rows,
        eigen_smooth: bool,
        layers: list[tuple[str, nn.Module]],
        scale: float,
    ) -> list[Explanation]:
        try:
            return self._explain(augmented, lambda output: fixed, eigen_smooth, layers)
        except GradCAMError:
            raise
        except (AssertionError, RuntimeError, ValueError) as error:
            # A model built for one input size (a timm ViT with a fixed patch grid) refuses the rescaled
            # copies: say so in one line rather than surface its traceback.
            size = "x".join(map(str, augmented.shape[2:]))
            reason = " ".join(str(error).split())[:160] or type(error).__name__
            raise GradCAMError(
                f"aug_smooth: the model does not take the {scale}x-scaled {size} input ({reason}); "
                "it needs a fixed input size, so explain without aug_smooth"
            ) from None


def row_explanation(
    raw: torch.Tensor,
    scored: Scored,
    layer: str,
    method: str,
    size: tuple[int, ...] | None,
    placement: Placement | None = None,
) -> Explanation:
    """The (N,B) Explanation of raw maps (N,B,h,w) for the rows ``scored`` on the explained forward;
    everything detached, on the CPU, in float32."""
    return Explanation(
        raw=raw.detach().float().cpu(),
        targets=scored.ids,
        scores=scored.scores,
        probs=scored.probs,
        layer=layer,
        method=method,
        logits=scored.logits,
        input_size=size,
        placement=placement,
    )


def _one_per_image(explanation: Explanation) -> Explanation:
    """The (B,) form of a one-row (1,B) Explanation."""
    e = explanation
    return replace(e, raw=e.raw[0], targets=e.targets[0], scores=e.scores[0], probs=e.probs[0])


#: Target rows differentiated together hold at most this many gradient elements (bounds memory).
GRADIENT_CHUNK_ELEMENTS = 32_000_000
#: Test-time augmentation scales for ``aug_smooth`` (each also mirrored).
AUGMENT_SCALES = (1.0, 1.25)


def _layout_list(spec: object, count: int) -> list[Layout | None]:
    """The caller's ``layout=``: one spec for every layer, or a list with one per layer."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != count:
            raise GradCAMError(f"got {len(spec)} layouts for {count} layers; expected one per layer")
        return [layouts.parse(item) for item in spec]
    return [layouts.parse(spec)] * count


def _augment(inputs: torch.Tensor, flip: bool, scale: float) -> torch.Tensor:
    out = inputs.flip(-1) if flip else inputs
    if scale != 1.0:
        size = (round(inputs.shape[2] * scale), round(inputs.shape[3] * scale))
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def _is_2d(targets: object) -> bool:
    return isinstance(targets, torch.Tensor) and targets.dim() == 2


def _is_function(targets: object) -> bool:
    return callable(targets) and not isinstance(targets, (torch.Tensor, str))


class WholeModelCAM(CAM):
    """Base of the methods that read the whole model rather than one layer (the attention methods,
    FullGrad): they take no ``layer``, ``counterfactual`` or ``layout``, and refuse each in one line saying
    why (``reads``, ``why_no_counterfactual``, ``why_no_layout``, after the method's name)."""

    explains_layer = False
    reads = "the whole model"
    why_no_counterfactual = "has no counterfactual map; use a gradient CAM method"
    why_no_layout = "reads the model's own outputs; layout does not apply"

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        counterfactual: bool = False,
        layout: object = None,
    ) -> None:
        if layer is not None:
            shown = layer if isinstance(layer, str) else type(layer).__name__
            raise GradCAMError(
                f"{self.method} uses {self.reads}, not one layer; pass layer=None (got {shown!r})"
            )
        if counterfactual:
            raise GradCAMError(f"{self.method} {self.why_no_counterfactual}")
        if layout is not None:
            raise GradCAMError(f"{self.method} {self.why_no_layout}")
        super().__init__(model)


def _call_chooser(targets: object, topk: int | None, batch: int) -> tuple[Chooser, bool]:
    """The chooser of a CAM call's ``targets``, and whether the result is one row per image (B,)."""
    functions = isinstance(targets, (list, tuple)) and bool(targets) and all(map(_is_function, targets))
    if _is_function(targets) or functions:
        if topk is not None:
            raise GradCAMError("topk chooses classes; give target functions or topk, not both")
        if getattr(targets, "chooses_rows", False):  # Detections, SegmentedClasses
            return targets, False  # type: ignore[return-value]
        listed = list(targets) if functions else [targets]  # type: ignore[arg-type]
        return (lambda output: TargetRows(listed, batch)), not functions
    single = not (isinstance(targets, str) or topk is not None or _is_2d(targets))

    def choose(output: object) -> Rows:
        logits = model_logits(output, batch)
        return ClassRows(_target_rows(logits.detach(), targets, topk), batch)

    return choose, single


def _target_rows(logits: torch.Tensor, targets: object, topk: int | None) -> torch.Tensor:
    """Targets as an (N, B) long tensor on the logits' device."""
    batch, classes = logits.shape
    if topk is not None:
        if targets is not None:
            raise GradCAMError("give targets or topk, not both")
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= classes:
            raise GradCAMError(f"topk must be an integer from 1 to {classes}, got {topk!r}")
        return logits.topk(topk, dim=1).indices.T.contiguous()
    if isinstance(targets, str):
        if targets != "all":
            raise GradCAMError(f"targets must be None, 'all', an int or class indices, got {targets!r}")
        return torch.arange(classes, device=logits.device)[:, None].expand(classes, batch).contiguous()
    if _is_2d(targets):
        return torch.stack([resolve(logits, row) for row in targets])
    return resolve(logits, targets)[None]


def _batched_grad(
    scores: torch.Tensor, activations: list[torch.Tensor], selector: torch.Tensor
) -> Sequence[torch.Tensor | None]:
    """d(selected scores)/d(activations) for each row of ``selector`` (n, N, B): one batched backward
    (vmap over the head's backward), or row by row where an operation has no batching rule."""
    try:
        return torch.autograd.grad(
            scores, activations, selector, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(scores, activations, row, retain_graph=True, allow_unused=True)
            for row in selector
        ]
        return [None if r[0] is None else torch.stack(r) for r in zip(*rows, strict=True)]


def _no_gradient(layer: str) -> str:
    return (
        f"no gradient reaches layer '{layer}' from the model output: choose a layer on the path to the "
        "output (does the model run it under torch.no_grad() or detach it?)"
    )
