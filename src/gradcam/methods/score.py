r"""Score-CAM and Ablation-CAM: channel weights from forward scores instead of gradients.

Both weigh each channel A^k of the layer by what the model's score does when the input or the layer is
perturbed along that channel, so each costs one forward per channel and image. They are made fast by

* batching the K perturbed forwards of an image in chunks of ``batch_size``;
* skipping the channels whose weight is known to be exactly zero without a forward (Score-CAM: a
  constant channel, whose mask is zero, so the masked input *is* the baseline; Ablation-CAM: an
  all-zero channel, whose ablation changes nothing);
* for Ablation-CAM, running only the part of the network *after* the layer on the cached, ablated
  activations (the peers re-run the whole network for every channel).

Every target of an image is scored from the same perturbed forwards (``topk=3`` costs what ``topk=1``
does). Progress is reported through a callback ``progress(done, total)`` counted in chunks; the caller
(the CLI) draws the bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as torch_module

from gradcam.errors import GradCAMError
from gradcam.layouts import LayoutSpec
from gradcam.methods.base import CAM, LayersSpec, MapContext

#: Called with (chunks done, chunks in all) as a call proceeds.
Progress = Callable[[int, int], None]

# Runs the model (or its tail) for image ``index`` on n perturbed versions: returns the model's output.
Scorer = Callable[[int, torch.Tensor], object]


class _ChunkedCAM(CAM):
    """A gradient-free method that scores K perturbations per image, ``batch_size`` per forward.

    Every target of an image is scored from the same perturbed forwards: with ``topk=3`` the masked or
    ablated inputs run once, not three times (``maps_all_rows``).
    """

    uses_gradients = False
    maps_all_rows = True

    def __init__(
        self,
        model: nn.Module,
        layer: LayersSpec = None,
        *,
        batch_size: int = 32,
        progress: Progress | bool | None = None,
        layout: LayoutSpec = None,
    ) -> None:
        super().__init__(model, layer, layout=layout)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GradCAMError(f"batch_size must be a positive integer, got {batch_size!r}")
        if progress is True or not (progress is None or progress is False or callable(progress)):
            raise GradCAMError(
                f"progress must be a callable (done, total) or None, got {progress!r}; the library "
                "reports progress, the caller draws it"
            )
        self.batch_size = batch_size
        self.progress = progress or None

    def layer_map(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        """L^c = ReLU(sum_k alpha_k^c A^k), (n,B,h,w) for the (n,B) targets, with the method's alpha."""
        weights = self._weights(activations, context)
        return torch.relu(torch.einsum("nbk,bkhw->nbhw", weights, activations))

    def weighted_activations(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, context: MapContext
    ) -> torch.Tensor:
        """The terms alpha_k^c A^k (n,B,K,h,w) whose channel sum is the map before its ReLU."""
        return self._weights(activations, context)[..., None, None] * activations

    def _weights(self, activations: torch.Tensor, context: MapContext) -> torch.Tensor:
        if not isinstance(context.inputs, torch.Tensor):
            raise GradCAMError(
                f"{self.method} perturbs a (B,C,H,W) batch image by image; a detector's list of images "
                "is explained by the gradient methods or Eigen-CAM"
            )
        with torch.inference_mode():
            weights = self.scored_weights(activations, context)
        return weights.clone()  # a normal tensor again, usable outside inference mode

    def scored_weights(self, activations: torch.Tensor, context: MapContext) -> torch.Tensor:
        """Channel weights alpha (n,B,K) for the (n,B) ``context.targets``, computed under
        ``torch.inference_mode()``, each perturbed forward scored for all n targets at once."""
        raise NotImplementedError

    def _chunks(self, live: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per image, the indices of its live channels in chunks of at most ``batch_size``."""
        # torch.split of an empty tensor gives one empty chunk: an image with no live channel gets none.
        return [list(torch.split(channels, self.batch_size)) if len(channels) else [] for channels in live]

    def _advance(self, total: int) -> Callable[[], None]:
        """A function to call after each chunk: reports (done, total) to ``progress`` when given."""
        report = self.progress
        if report is None:
            return lambda: None
        done = [0]
        report(0, total)

        def advance() -> None:
            done[0] += 1
            report(done[0], total)

        return advance


def _normalised_masks(channels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H^k = s(Up(A^k)) for channels (n,h,w): bilinear upsampling to ``size``, then min-max to [0,1].

    Returns (n,1,H,W). Only called for non-constant channels; a map that upsampling makes constant
    (possible when downsampling) still gives a zero mask, never a division by zero.
    """
    up = F.interpolate(channels[:, None], size=size, mode="bilinear", align_corners=False)
    low = up.amin(dim=(2, 3), keepdim=True)
    span = up.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (up - low) / torch.where(span > 0, span, 1), 0)


def _non_constant(activations: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the indices of the channels that are not constant over (h,w)."""
    flat = activations.flatten(2)
    varies = flat.amax(dim=2) > flat.amin(dim=2)
    return [row.nonzero()[:, 0] for row in varies]


class ScoreCAM(_ChunkedCAM):
    r"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020).

    For image X, class c and the activations A^k of the layer (k = 1..K):

        H^k       = s(Up(A^k))                         Up: bilinear to the input size, s: min-max to [0,1]
        alpha_k^c = C(A^k) = f^c(X o H^k) - f^c(X_b)   Definition 2, "channel-wise increase of confidence"
        L^c       = ReLU( sum_k alpha_k^c A^k )

    with o the element-wise product over pixels, f^c the softmax probability of class c (a target
    function's own score) and the baseline X_b the zero input (for a normalised model input: the mean
    image). A channel that is constant over the layer's positions has no spatial information: its mask
    is zero, X o H^k = X_b and alpha_k^c = 0 exactly, so its forward is skipped. The K masked inputs of
    an image are scored in chunks of ``batch_size`` under ``torch.inference_mode()``.

    Other implementations differ: pytorch-grad-cam (``score_cam.py``) takes the target's *logit* on each
    masked input, subtracts no baseline and applies a softmax across the K channels of an image (so its
    weights sum to one), and normalises with ``(up - min) / (max - min + 1e-8)``; the authors' code
    (``haofanwang/Score-CAM``) uses the softmax probability like us but subtracts no baseline. We follow
    the paper's CIC with its baseline, so the maps differ from both: from the authors' code by the
    baseline term p^c(X_b) sum_k A^k (over the non-constant channels), from pytorch-grad-cam entirely.

    Args:
        model, layer: as for :class:`gradcam.GradCAM`.
        batch_size: masked inputs per forward.
        progress: a callable (chunks done, chunks in all), called as the call proceeds; None: silent.

    Example:
        >>> cam = ScoreCAM(model, "layer4", batch_size=64)
        >>> explanation = cam(batch, targets=[281, 282])
    """

    method = "scorecam"
    #: Masks scored per channel (the variants in :mod:`gradcam.methods.noisy` average several).
    samples = 1

    def _new_generator(self) -> torch.Generator | None:
        """The call's generator of noise (None: the method draws none)."""
        return None

    def _noise(self, generator: torch.Generator | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        """One sample's noise for an image's live channels (n,1,H,W); None for a noise-free method."""
        return None

    def _sample_masks(self, masks: torch.Tensor, sample: int, noise: torch.Tensor | None) -> torch.Tensor:
        """Sample ``sample`` (0-based) of the masks (n,1,H,W); ``noise`` is that sample's rows for them.
        Score-CAM's one sample is the masks themselves."""
        return masks

    def scored_weights(self, activations: torch.Tensor, context: MapContext) -> torch.Tensor:
        model, x, rows = context.model, context.inputs, context.rows
        assert isinstance(x, torch.Tensor) and rows is not None
        if x.dim() != 4:
            raise GradCAMError(
                f"{self.method} masks (B,C,H,W) images; for clips use Grad-CAM or Ablation-CAM"
            )
        size = (x.shape[2], x.shape[3])
        baseline = model(torch.zeros_like(x[:1]))
        weights = activations.new_zeros(context.targets.shape[0], *activations.shape[:2])
        live = _non_constant(activations)
        chunks = self._chunks(live)
        advance = self._advance(sum(map(len, chunks)) * self.samples)
        generator = self._new_generator()
        for index, image_chunks in enumerate(chunks):
            base = rows.image_scores(index, baseline, probability=True)  # (1, n)
            for sample in range(self.samples):
                noise = self._noise(generator, (len(live[index]), 1, *size))
                start = 0
                for channels in image_chunks:
                    masks = _normalised_masks(activations[index, channels], size).to(x.dtype)
                    own = None if noise is None else noise[start : start + len(channels)]
                    masks = self._sample_masks(masks, sample, own)
                    masked = rows.image_scores(index, model(x[index : index + 1] * masks), probability=True)
                    weights[:, index, channels] += (masked - base).T.to(weights.dtype) / self.samples
                    start += len(channels)
                    advance()
        return weights


class AblationCAM(_ChunkedCAM):
    r"""Ablation-CAM (Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network
    via Gradient-free Localization", WACV 2020).

    For class c with pre-softmax score y^c, and y_k^c the score when channel k of the layer's
    activation is set to zero (the other channels and everything before the layer unchanged):

        alpha_k^c = (y^c - y_k^c) / y^c            ("slope", eq. 3 of the paper)
        L^c       = ReLU( sum_k alpha_k^c A^k )

    The paper assumes y^c > 0. We divide by |y^c|, clamped to at least the dtype's machine epsilon:
    identical for y^c > 0; for y^c < 0 the paper's formula would flip every weight's sign (a channel
    whose removal *lowers* the score would count against the class) and for y^c ~ 0 it would blow up.
    A channel that is zero everywhere is left out: its ablation changes nothing, alpha_k^c = 0.

    Speed: the layer's activation is cached and only the network *after* the layer runs on the K
    ablated copies, ``batch_size`` at a time. The cut is made with ``torch.fx``: the model is traced
    symbolically (through the layer's parent modules only; every other module is called as a black
    box), the nodes that depend on the layer's output form the tail, and every other value the tail
    reads (a skip connection from before the layer, the input itself) is taken from one real forward
    of the batch and repeated along the batch for each image's ablations. The tail is checked before
    use: from the layer's activation it must reproduce the model's logits. When the model cannot be
    traced or cut (data-dependent control flow in the layer's parents, forward hooks on them, a
    non-tensor value derived from the input such as ``x.shape[0]`` read after the layer), or the check
    fails (in-place updates that a traced graph does not show), the whole model is re-run instead, with
    a call-scoped forward hook that replaces the layer's output by the ablated batch: the same numbers,
    the peers' cost. Nothing is stored on or registered with the model; tracing runs the Python
    ``forward`` of the model and of the layer's parent modules once, on symbolic values. The per-image
    semantics assume that the images of a batch do not interact (true in eval mode).

    Other implementations differ: pytorch-grad-cam (``ablation_cam.py``) swaps the layer for an
    ablation module inside the user's model during the call and re-runs the whole network, and sets
    the ablated channel to ``min(A) - 1e7`` rather than zero whenever the activations' minimum is not 0.

    Args:
        model, layer: as for :class:`gradcam.GradCAM`.
        batch_size: ablated copies per forward.
        progress: as for :class:`ScoreCAM`.
    """

    method = "ablationcam"
    _use_tail = True  # False: always re-run the whole model (the fallback; for tests and benchmarks)

    def scored_weights(self, activations: torch.Tensor, context: MapContext) -> torch.Tensor:
        rows = context.rows
        assert rows is not None
        weights = activations.new_zeros(context.targets.shape[0], *activations.shape[:2])
        live = [row.nonzero()[:, 0] for row in activations.flatten(2).ne(0).any(dim=2)]
        chunks = self._chunks(live)
        own = context.output if context.output is not None else activations  # the layer's own layout
        with self._scorer(own, context) as (output, score):
            y = rows.scores(output)  # (n, B)
            denominator = y.abs().clamp_min(torch.finfo(y.dtype).eps)
            advance = self._advance(sum(map(len, chunks)))
            for index, image_chunks in enumerate(chunks):
                for channels in image_chunks:
                    ablated = activations[index].expand(len(channels), *activations.shape[1:]).clone()
                    ablated[torch.arange(len(channels), device=channels.device), channels] = 0
                    ablated = context.layout.layer_output(ablated, like=own[index : index + 1])
                    ablated_scores = rows.image_scores(index, score(index, ablated)).T  # (n, chunk)
                    slope = (y[:, index, None] - ablated_scores) / denominator[:, index, None]
                    weights[:, index, channels] = slope.to(weights.dtype)
                    advance()
        return weights

    @contextmanager
    def _scorer(self, activations: torch.Tensor, context: MapContext) -> Iterator[tuple[object, Scorer]]:
        """Yield (output of the batch, scorer of ablated activations): the fx tail, else the whole model."""
        tail = None
        if self._use_tail:
            try:
                tail = _cut_after(context, activations)
            except Exception:  # untraceable, uncuttable or failing its check: re-run the whole model
                tail = None
        if tail is not None:
            yield tail.output, tail
            return
        with _rerun_whole_model(context) as scored:
            yield scored


@contextmanager
def _rerun_whole_model(context: MapContext) -> Iterator[tuple[object, Scorer]]:
    """The fallback: whole forwards of n copies of the image, the layer's output replaced by the ablated
    batch through a forward hook that exists only inside the ``with`` block."""
    model, module, x = context.model, context.module, context.inputs
    pending: list[torch.Tensor] = []

    def replace(module: nn.Module, args: object, output: object) -> torch.Tensor | None:
        if not pending:
            return None
        ablated = pending.pop()
        if not isinstance(output, torch.Tensor) or output.shape != ablated.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise GradCAMError(f"layer '{context.layer}' returned {got}; expected {tuple(ablated.shape)}")
        return ablated

    def score(index: int, ablated: torch.Tensor) -> object:
        pending[:] = [ablated]
        try:
            return model(x[index : index + 1].expand(len(ablated), *x.shape[1:]).clone())
        finally:
            pending.clear()

    handle = module.register_forward_hook(replace)
    try:
        yield model(x), score
    finally:
        handle.remove()


class _Unsplittable(Exception):
    """The model cannot be cut after the layer; the whole network is re-run instead."""


class _Root(nn.Module):
    """What is traced instead of the user's model: fx stores tensor constants on the root it traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> object:
        return self.model(x)


class _Tracer(fx.Tracer):
    """Traces through the layer's parent modules only; every other module, and the layer, is a leaf."""

    def __init__(self, layer: nn.Module, parents: list[nn.Module]) -> None:
        super().__init__()
        self._layer = layer
        self._parents = {id(module) for module in parents}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self._layer or id(m) not in self._parents


@dataclass
class _Tail:
    """The network after the layer: ``tail(index, ablated)`` is the output for image ``index``'s ablations."""

    module: fx.GraphModule  # (activation, *externals) -> the model's output
    externals: list[object]  # values from before the layer that the tail reads, from the batch's forward
    batched: list[bool]  # which of them derive from the input (one row per image)
    output: object  # the tail's output on the batch's own activation

    def __call__(self, index: int, ablated: torch.Tensor) -> object:
        count = ablated.shape[0]
        values = [
            value[index : index + 1].expand(count, *value.shape[1:]).clone() if batched else value
            for value, batched in zip(self.externals, self.batched, strict=True)
        ]
        return self.module(ablated, *values)


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts))]


def _has_forward_hooks(modules: list[nn.Module]) -> bool:
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _snapshot(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _close(actual: object, expected: torch.Tensor) -> bool:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    eps = torch.finfo(actual.dtype).eps if actual.dtype.is_floating_point else 0.0
    scale = expected.abs().max().double().clamp_min(1.0)
    return bool((actual.double() - expected.double()).abs().max() <= max(1e-4, 64 * eps) * scale)


def _cut_after(context: MapContext, activations: torch.Tensor) -> _Tail:
    """Split the model after ``context.module`` with torch.fx; raise :class:`_Unsplittable` if it can't.

    The traced graph is split in three: the *tail* (the nodes that depend on the layer's output), the
    *externals* (the other nodes the tail reads) and what computes them (the *prefix*, run once on the
    batch). The layer itself never runs.
    """
    root, graph, cut = _trace_to_layer(context)
    tail_nodes, externals, batched = _split(graph, cut)
    values, has_batch = _run_prefix(root, graph, externals, context.inputs)
    for node, wanted, has in zip(externals, batched, has_batch, strict=True):
        if wanted and not has:
            raise _Unsplittable(f"'{node.name}' derives from the input but has no batch dimension")

    tail_graph = fx.Graph()
    env = {cut: tail_graph.placeholder("activation")}
    for index, node in enumerate(externals):
        env[node] = tail_graph.placeholder(f"external_{index}")
    for node in tail_nodes:
        env[node] = tail_graph.node_copy(node, env.__getitem__)
    tail = fx.GraphModule(root, tail_graph)

    # The cut must reproduce the model: from the layer's activation, the tail gives the rows' scores.
    # The tail may update a per-image value in place (each chunk gets its own copy), not a shared one.
    checked = [_snapshot(value) for value in values]
    output = tail(activations.clone(), *checked)
    for node, value, after, per_image in zip(externals, values, checked, batched, strict=True):
        if not per_image and isinstance(value, torch.Tensor) and not torch.equal(value, after):
            raise _Unsplittable(f"the tail modifies '{node.name}' in place")
    assert context.rows is not None and context.scores is not None
    if not _close(context.rows.scores(output), context.scores):
        raise _Unsplittable("the tail does not reproduce the model's scores from the layer's activation")
    return _Tail(tail, values, batched, output)


def _trace_to_layer(context: MapContext) -> tuple[_Root, fx.Graph, fx.Node]:
    """The model traced through the layer's parents, and the one node that calls the layer."""
    model, layer = context.model, context.module
    parents = _parents(model, context.layer)
    if _has_forward_hooks(parents):
        raise _Unsplittable("forward hooks on the layer's parent modules would run during tracing")
    root = _Root(model)
    graph = _Tracer(layer, [root, *parents]).trace(root)
    cuts = [n for n in graph.nodes if n.op == "call_module" and root.get_submodule(n.target) is layer]
    if len(cuts) != 1:
        raise _Unsplittable(f"the layer is called {len(cuts)} times in the traced graph")
    return root, graph, cuts[0]


def _split(graph: fx.Graph, cut: fx.Node) -> tuple[list[fx.Node], list[fx.Node], list[bool]]:
    """(tail nodes after the cut, the other nodes they read, whether each of those derives from the
    input)."""
    downstream, from_input = {cut}, set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in from_input for arg in node.all_input_nodes):
            from_input.add(node)
        if node is not cut and any(arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    tail_nodes = [node for node in graph.nodes if node in downstream and node is not cut]
    if not tail_nodes or tail_nodes[-1].op != "output":
        raise _Unsplittable("the model's output does not depend on the layer")
    externals = list(
        dict.fromkeys(arg for node in tail_nodes for arg in node.all_input_nodes if arg not in downstream)
    )
    return tail_nodes, externals, [node in from_input for node in externals]


def _run_prefix(
    root: nn.Module, graph: fx.Graph, externals: list[fx.Node], x: torch.Tensor
) -> tuple[list[object], list[bool]]:
    """The externals' values from one forward of the batch through the nodes they need (nothing else,
    the layer included, runs); and whether each is a tensor with the batch's leading dimension."""
    if not externals:
        return [], []
    needed = set(externals)
    for node in reversed(list(graph.nodes)):
        if node in needed:
            needed.update(node.all_input_nodes)
    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in needed or node.op == "placeholder":
            env[node] = prefix.node_copy(node, env.__getitem__)
    prefix.output(tuple(env[node] for node in externals))
    values = list(fx.GraphModule(root, prefix)(x))
    batch = x.shape[0]
    return values, [isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch for v in values]
