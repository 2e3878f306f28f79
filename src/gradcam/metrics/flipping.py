r"""Removing what the map ranks first: pixel flipping, monotonicity, region perturbation, selectivity
and IROF.

Each metric orders units of the image by the map (pixels, square patches or superpixels), replaces them
cumulatively with a baseline (monotonicity: puts them back on a baseline image) and scores every
perturbed copy with the model: the target's softmax probability (``softmax=True``) or its logit.

Conventions shared by all five (Quantus 0.6 reproduces each number with the settings its docstring
gives):

- ``inputs`` (B,C,H,W) as the model takes them, ``maps`` (B,H,W) at the inputs' size, ``targets`` (B,)
  classes. Maps are used as given (pass ``maps.abs()`` for Quantus's abs=True); Quantus's ``normalise``
  divides by a positive number and changes no ranking, so none of these numbers.
- A unit is removed in all C channels at once. Quantus broadcasts a (B,H,W) map to (B,C,H,W) and ranks
  the C H W single values, so its ``features_in_step`` is C times our pixels per step.
- Rankings are stable (equal values in raster order, :func:`~gradcam.metrics.perturbation.salience_order`);
  Quantus's NumPy quicksort breaks ties arbitrarily, so maps with ties can differ from it.
- The baseline is ``"black"`` (each image's minimum over all channels and pixels, Quantus's "black"),
  ``"white"`` (its maximum), ``"mean"`` (each image's per-channel mean, computed once on the unperturbed
  image), a number, or a tensor broadcastable to the inputs. Quantus's "mean" is recomputed from the
  partly replaced array at every step (and, in IROF, over the whole batch), so use a number to compare
  a mean fill with it.
- Perturbed copies are scored ``batch_size`` at a time without gradients; the model is left as found
  (every module's training flag, requires_grad and hooks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from skimage.segmentation import slic
from torch import nn

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.metrics.map_checks import map_batch, positive_int
from gradcam.metrics.perturbation import check_batch, salience_order
from gradcam.metrics.scoring import DEFAULT_BATCH_SIZE, target_probabilities
from gradcam.models.base import model_device
from gradcam.targets import model_logits

Baseline = str | float | torch.Tensor

#: Quantus's default patch side for region perturbation and selectivity.
PATCH_SIZE = 8
#: Quantus's default number of regions removed by region perturbation.
REGIONS = 100
#: scikit-image's SLIC defaults, which Quantus's IROF uses (``slic(image, start_label=0)``).
SLIC_SEGMENTS = 100
SLIC_COMPACTNESS = 10.0


# ------------------------------------------------------------------------------------------ shared parts


def fill_image(inputs: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """(B,C,H,W): the values removed units take (module docstring for the choices)."""
    if isinstance(baseline, str):
        if baseline == "black":
            return inputs.amin(dim=(1, 2, 3), keepdim=True).expand_as(inputs)
        if baseline == "white":
            return inputs.amax(dim=(1, 2, 3), keepdim=True).expand_as(inputs)
        if baseline == "mean":
            return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    elif isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs.device, inputs.dtype), inputs.shape)
        except RuntimeError:
            raise GradCAMError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' "
                f"{tuple(inputs.shape)}"
            ) from None
    raise GradCAMError(f"baseline must be 'black', 'white', 'mean', a number or a tensor; got {baseline!r}")


def _rebatched(
    images: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The stream of (images, targets) pieces regrouped into pieces of exactly ``batch_size`` rows (the
    last one shorter), so that at most one batch of perturbed copies is held at a time."""
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    held = 0
    for x, t in images:
        xs.append(x)
        ts.append(t)
        held += len(x)
        while held >= batch_size:
            x_all, t_all = torch.cat(xs), torch.cat(ts)
            yield x_all[:batch_size], t_all[:batch_size]
            xs, ts, held = [x_all[batch_size:]], [t_all[batch_size:]], held - batch_size
    if held:
        yield torch.cat(xs), torch.cat(ts)


@torch.no_grad()
def target_logits(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """f(x_m)[t_m], the target's pre-softmax score, for each row of ``inputs`` (M,C,H,W) as a float64
    CPU tensor (M,), from one forward in eval mode (each module's flag restored), in the model's own
    precision (no rounding to float32)."""
    with torch.inference_mode(False), eval_mode(model):
        logits = model_logits(model(inputs.to(model_device(model))))
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise GradCAMError(f"targets must be classes 0..{logits.shape[1] - 1}, got {targets.tolist()}")
    return logits.gather(1, targets.to(logits.device)[:, None].long())[:, 0].double().cpu()


def target_scores(
    model: nn.Module,
    images: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    softmax: bool,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """(M,) float64: each streamed image's target probability (``softmax``) or logit, in stream order,
    from forwards of ``batch_size`` rows (eval mode, no gradients, model flags restored)."""
    out = []
    for x, t in _rebatched(images, batch_size):
        if softmax:
            out.append(target_probabilities(model, x, t, batch_size=batch_size))
        else:
            out.append(target_logits(model, x, t))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def unit_curves(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    unit_ranks: torch.Tensor,
    counts: Sequence[torch.Tensor],
    fill: torch.Tensor,
    *,
    remove: bool = True,
    softmax: bool,
    batch_size: int,
) -> list[torch.Tensor]:
    """Image b's scores (len(counts[b]),) after its units of rank < n are replaced by ``fill`` (or, with
    ``remove=False``, after only they are put back on ``fill``), for each n of ``counts[b]``.
    ``unit_ranks`` (B,H,W) gives every pixel the rank of the unit it belongs to (0 = first)."""
    device = model_device(model)
    inputs, fill, unit_ranks = inputs.to(device), fill.to(device), unit_ranks.to(device)
    targets = targets.to(device)

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(inputs)):
            for start in range(0, len(counts[b]), batch_size):
                n = counts[b][start : start + batch_size].to(device)
                chosen = (unit_ranks[b] < n[:, None, None])[:, None]
                x = (
                    torch.where(chosen, fill[b], inputs[b])
                    if remove
                    else torch.where(chosen, inputs[b], fill[b])
                )
                yield x, targets[b].expand(len(n))

    with torch.no_grad():
        scores = target_scores(model, images(), softmax=softmax, batch_size=batch_size)
    return list(torch.split(scores, [len(n) for n in counts]))


def _checked(
    inputs: object, maps: object, targets: object, batch_size: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise GradCAMError(f"inputs must be a floating (B,C,H,W) tensor, got {type(inputs).__name__}")
    positive_int(batch_size, "batch_size")
    values = map_batch(maps)
    targets = check_batch(inputs, values, targets)
    return inputs.detach(), values, targets


def _ranks_of(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation of each row of ``order`` (B,N): the position of every index in it."""
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


def _step_counts(units: int, per_step: int, batch: int) -> list[torch.Tensor]:
    """min(j * per_step, units) for j = 1..ceil(units / per_step), for each of ``batch`` images."""
    steps = math.ceil(units / per_step)
    counts = torch.clamp(torch.arange(1, steps + 1) * per_step, max=units)
    return [counts] * batch


def _stacked_trapezoid(curves: list[torch.Tensor]) -> torch.Tensor:
    """(B,) trapezoid-rule area of each curve with unit spacing (NumPy's ``trapz(curve, dx=1)``)."""
    return torch.stack([torch.trapezoid(curve, dx=1.0) for curve in curves])


# --------------------------------------------------------------------------------- pixel-wise metrics


def pixel_flipping(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    pixels_per_step: int = 1,
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Pixel flipping (Bach, Binder, Montavon, Klauschen, Müller, Samek, "On Pixel-Wise Explanations for
    Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 10(7), 2015).

    The pixels are removed most salient first, k = ``pixels_per_step`` at a time: step j = 1..S,
    S = ceil(H W / k), replaces the min(j k, H W) most salient pixels (all channels) with the baseline
    and scores p_j = f_t(x^(j)). The result is the area under that curve with unit spacing,

        AUC = sum_{j=1}^{S-1} (p_j + p_{j+1}) / 2,

    lower is better (a faithful map makes p fall fast). The unperturbed image is not on the curve.
    Returns (B,) float64.

    Quantus 0.6: ``PixelFlipping(features_in_step=C k, perturb_baseline="black",
    return_auc_per_sample=True)`` called with ``softmax=True`` (its defaults otherwise); Quantus needs
    C k to divide H W (its area is NumPy's ``trapz``, removed in NumPy 2.4: ``np.trapezoid``).
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    per_step = positive_int(pixels_per_step, "pixels_per_step")
    batch, _, height, width = inputs.shape
    ranks = _ranks_of(salience_order(values)).reshape(values.shape)
    curves = unit_curves(
        model,
        inputs,
        targets,
        ranks,
        _step_counts(height * width, per_step, batch),
        fill_image(inputs, baseline),
        softmax=softmax,
        batch_size=batch_size,
    )
    return _stacked_trapezoid(curves)


def monotonicity(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    pixels_per_step: int = 1,
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Monotonicity (Arya et al., "One Explanation Does Not Fit All: A Toolkit and Taxonomy of AI
    Explainability Techniques", arXiv:1909.03012, 2019; AIX360's ``monotonicity_metric``).

    Start from the baseline image and put the image's pixels back least salient first, k =
    ``pixels_per_step`` at a time: step j = 1..S, S = ceil(H W / k), holds the min(j k, H W) least
    salient pixels of x (all channels) and the baseline elsewhere, scored p_j = f_t(x^(j)). The map is
    monotonic when every added group raises the score or keeps it:

        monotonic = 1 if p_{j+1} >= p_j for all j = 1..S-1, else 0.

    Returns (B,) float64 of 1.0 and 0.0 (their mean is the share of monotonic maps); higher is better.

    Quantus 0.6's ``Monotonicity`` means this, but its perturbation writes the baseline value (instead
    of the image's) into the baseline image, which therefore never changes: it returns True for every
    map. ``Monotonicity(features_in_step=C k, perturb_baseline="black", abs=False,
    perturb_func=f)`` with ``softmax=True`` reproduces ours when f(arr, indices, **kw) returns a copy
    of arr with arr[b, indices[b]] set to the flattened input's x[b, indices[b]] (the paper's step).
    Quantus's default abs=True ranks |L|: pass ``maps.abs()`` for that.
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    per_step = positive_int(pixels_per_step, "pixels_per_step")
    batch, _, height, width = inputs.shape
    ranks = _ranks_of(salience_order(values, descending=False)).reshape(values.shape)
    curves = unit_curves(
        model,
        inputs,
        targets,
        ranks,
        _step_counts(height * width, per_step, batch),
        fill_image(inputs, baseline),
        remove=False,
        softmax=softmax,
        batch_size=batch_size,
    )
    return torch.stack([(torch.diff(curve) >= 0).all().double() for curve in curves])


# ------------------------------------------------------------------------------------ patch-wise metrics


def patch_ids(height: int, width: int, patch_size: int) -> tuple[torch.Tensor, int]:
    """(H,W) long: each pixel's patch, in raster order of the grid of ``patch_size`` squares laid over
    the image padded to a multiple of the side (the padding split floor/ceil between the two ends, as
    Quantus pads), and the number of patches."""
    pad_h, pad_w = -height % patch_size, -width % patch_size
    rows = (torch.arange(height) + pad_h // 2) // patch_size
    cols = (torch.arange(width) + pad_w // 2) // patch_size
    grid_cols = (width + pad_w) // patch_size
    return rows[:, None] * grid_cols + cols[None, :], ((height + pad_h) // patch_size) * grid_cols


def _unit_ranks(
    values: torch.Tensor, ids: torch.Tensor, units: int, reduce: str, descending: bool
) -> torch.Tensor:
    """(B,H,W): each pixel's unit's rank when units (``ids`` (B,H,W) or (H,W), 0..units-1) are ordered by
    the sum or mean of the map over them (stable; descending: most salient first)."""
    flat_ids = torch.broadcast_to(ids, values.shape).flatten(1)
    scores = torch.zeros(len(values), units, dtype=torch.float64).scatter_add_(1, flat_ids, values.flatten(1))
    if reduce == "mean":
        sizes = torch.zeros(len(values), units, dtype=torch.float64)
        scores = scores / sizes.scatter_add_(1, flat_ids, torch.ones_like(values.flatten(1)))
    ranks = _ranks_of(salience_order(scores[:, None], descending=descending))
    return torch.gather(ranks, 1, flat_ids).reshape(values.shape)


def _patch_setup(
    inputs: torch.Tensor, values: torch.Tensor, patch_size: object, order: str
) -> tuple[torch.Tensor, int]:
    height, width = inputs.shape[2:]
    side = positive_int(patch_size, "patch_size", most=max(height, width))
    if order not in ("morf", "lerf"):
        raise GradCAMError(f"order must be 'morf' or 'lerf', got {order!r}")
    ids, patches = patch_ids(height, width, side)
    return _unit_ranks(values, ids, patches, "sum", descending=order == "morf"), patches


def region_perturbation(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    patch_size: int = PATCH_SIZE,
    regions: int = REGIONS,
    order: str = "morf",
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Region perturbation and its AOPC (Samek, Binder, Montavon, Lapuschkin, Müller, "Evaluating the
    Visualization of What a Deep Neural Network Has Learned", IEEE TNNLS 28(11), 2017).

    The image (padded to a multiple of ``patch_size``, see :func:`patch_ids`) is cut into square
    patches, ranked by the sum of the map over each: most relevant first (``order="morf"``) or least
    (``"lerf"``). Step k = 1..L, L = min(``regions``, patches), replaces the first k patches with the
    baseline and scores p_k = f_t(x^(k)); p_0 is the unperturbed image's. The result is the area over
    the perturbation curve,

        AOPC = 1 / (L + 1) sum_{k=0}^{L} (p_0 - p_k),

    high is good for MoRF (the prediction falls fast), low for LeRF. Samek et al. use 9x9 patches and
    uniform noise; Quantus's defaults, used here, are 8x8 patches and the black baseline. Returns (B,)
    float64.

    Quantus 0.6: ``RegionPerturbation(patch_size=.., order=.., regions_evaluation=L,
    perturb_baseline="black")`` with ``softmax=True`` returns the curve p_0 - p_k (k = 1..L); its sum
    divided by L + 1 is this number.
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    regions = positive_int(regions, "regions")
    ranks, patches = _patch_setup(inputs, values, patch_size, order)
    steps = min(regions, patches)
    counts = [torch.arange(steps + 1)] * len(inputs)
    curves = unit_curves(
        model,
        inputs,
        targets,
        ranks,
        counts,
        fill_image(inputs, baseline),
        softmax=softmax,
        batch_size=batch_size,
    )
    return torch.stack([(curve[0] - curve).sum() / (steps + 1) for curve in curves])


def selectivity(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    patch_size: int = PATCH_SIZE,
    baseline: Baseline = "black",
    softmax: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Selectivity (Montavon, Samek, Müller, "Methods for Interpreting and Understanding Deep Neural
    Networks", Digital Signal Processing 73, 2018, section 5.2).

    Patches as in :func:`region_perturbation` are removed most relevant first until none is left; step
    k = 1..P (P patches) scores p_k = f_t(x^(k)) with the first k patches replaced by the baseline.
    The result is the area under the curve with unit spacing,

        AUC = sum_{k=1}^{P-1} (p_k + p_{k+1}) / 2,

    lower is better (the prediction drops as soon as the relevant patches go). Returns (B,) float64.

    Quantus 0.6: ``Selectivity(patch_size=.., perturb_baseline="black")`` with ``softmax=True`` returns
    each curve; NumPy's ``trapz`` (``np.trapezoid``) of it is this number (its ``get_auc_score``
    averages these over the images).
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    ranks, patches = _patch_setup(inputs, values, patch_size, "morf")
    counts = [torch.arange(1, patches + 1)] * len(inputs)
    curves = unit_curves(
        model,
        inputs,
        targets,
        ranks,
        counts,
        fill_image(inputs, baseline),
        softmax=softmax,
        batch_size=batch_size,
    )
    return _stacked_trapezoid(curves)


# ------------------------------------------------------------------------------------------------ IROF


def slic_segments(
    inputs: torch.Tensor, *, n_segments: int = SLIC_SEGMENTS, compactness: float = SLIC_COMPACTNESS
) -> torch.Tensor:
    """(B,H,W) long: scikit-image's SLIC superpixels of each image (channels last, float64, labels from
    0), as Quantus's IROF computes them; the image is the model's input as given."""
    n_segments = positive_int(n_segments, "n_segments")
    arrays = inputs.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    labels = [slic(image, n_segments=n_segments, compactness=compactness, start_label=0) for image in arrays]
    return torch.from_numpy(np.stack(labels)).long()


def _segment_ids(segments: object, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """Each image's labels renumbered 0..K_b-1 in increasing order, and every K_b (at least 2)."""
    if not isinstance(segments, torch.Tensor) or segments.is_floating_point() or segments.dtype == torch.bool:
        raise GradCAMError(f"segments must be an integer (B,H,W) tensor, got {type(segments).__name__}")
    if tuple(segments.shape) != tuple(shape):
        raise GradCAMError(f"segments must have the maps' shape {tuple(shape)}, got {tuple(segments.shape)}")
    ids, sizes = [], []
    for b, labels in enumerate(segments.cpu()):
        found, inverse = torch.unique(labels, return_inverse=True)
        if len(found) < 2:
            raise GradCAMError(f"segments[{b}] has {len(found)} segment; IROF needs at least 2")
        ids.append(inverse)
        sizes.append(len(found))
    return torch.stack(ids), sizes


def irof(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    segments: torch.Tensor | None = None,
    baseline: Baseline = "mean",
    softmax: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""IROF, Iterative Removal Of Features (Rieger, Hansen, "IROF: a low resource evaluation metric
    for explanation methods", ICLR 2020 workshop, arXiv:2003.08747).

    The image is cut into superpixels (``segments`` (B,H,W) integer labels, by default
    :func:`slic_segments` of the inputs), ranked by the mean of the map over each, most relevant
    first. Step k = 1..K (K segments) replaces the first k with the baseline (the paper's mean; see
    the module docstring) and scores p_k = f_t(x^(k)) against the unperturbed p_0. Following Quantus,
    the area over the normalised curve is taken with unit spacing:

        IROF = K - sum_{k=1}^{K-1} (p_k + p_{k+1}) / (2 p_0),

    higher is better. The paper's area uses the fraction of segments removed as the axis and starts at
    p_0 / p_0 = 1; Quantus's (and this) grows with K, so compare images with similar K. Returns (B,)
    float64.

    Quantus 0.6: ``IROF(return_aggregate=False, perturb_baseline=v)`` with ``softmax=True`` for a
    number v, run with ``batch_size=1`` (it pads the curves of a batch to the largest K and counts the
    drop from p_K to 0 for images with fewer segments). Its default replacement asserts that the
    (B,1,H,W) mask has the (B,C,H,W) image's shape, so for C > 1 give it a ``perturb_func`` that
    broadcasts the mask over the channels before Quantus's ``baseline_replacement_by_mask``.
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    if segments is None:
        segments = slic_segments(inputs)
    ids, sizes = _segment_ids(segments, tuple(values.shape))
    ranks = torch.stack(
        [
            _unit_ranks(v[None], i, k, "mean", descending=True)[0]
            for v, i, k in zip(values, ids, sizes, strict=True)
        ]
    )
    curves = unit_curves(
        model,
        inputs,
        targets,
        ranks,
        [torch.arange(k + 1) for k in sizes],
        fill_image(inputs, baseline),
        softmax=softmax,
        batch_size=batch_size,
    )
    return torch.stack([len(c) - 1 - torch.trapezoid(c[1:] / c[0], dx=1.0) for c in curves])
