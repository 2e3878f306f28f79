r"""The seeded metrics: faithfulness correlation (random subsets), max- and avg-sensitivity (random
noise), random logit (a random other class).

Every draw comes from a private NumPy ``RandomState(seed)`` (the legacy Mersenne Twister stream that
``np.random.seed`` sets for NumPy's global functions, which Quantus 0.6 draws from), in the order each
docstring gives, so a result is reproducible from its seed and nothing global is touched.

The sensitivity metrics and random logit need explanations of inputs the caller does not have: they take
``explain(inputs, targets)``, a callable returning maps (B,H,W) (a tensor) or an
:class:`~gradcam.Explanation` (its ``maps`` are used), e.g. a ``gradcam.GradCAM`` instance. It is called
with gradients enabled, on batches of max(B, ``batch_size``) rows at most (several noise samples
stacked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.metrics.flipping import Baseline, _checked, fill_image, target_scores
from gradcam.metrics.map_checks import map_batch, numpy_rng, positive_int
from gradcam.metrics.sanity import ssim
from gradcam.metrics.scoring import DEFAULT_BATCH_SIZE
from gradcam.models.base import model_device

Explain = Callable[[torch.Tensor, torch.Tensor], object]

#: Quantus's defaults: 100 random subsets of 224 features; 200 noise samples of radius 0.2.
RUNS = 100
SUBSET_SIZE = 224
SAMPLES = 200
RADIUS = 0.2


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (B,N) arrays; NaN for a row where either is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    scale = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (a * b).sum(axis=1) / scale, np.nan)


def faithfulness_correlation(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    targets: object,
    *,
    runs: int = RUNS,
    subset_size: int = SUBSET_SIZE,
    baseline: Baseline = "black",
    softmax: bool = False,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Faithfulness correlation (Bhatt, Weller, Moura, "Evaluating and Aggregating Feature-based Model
    Explanations", IJCAI 2020, section 4.1): does the map's mass on a random set of pixels predict how
    much removing them changes the output?

    For r = 1..R (``runs``) draw a subset S_r of ``subset_size`` pixels, replace them (all channels)
    with the baseline and compare

        mu_F = corr_r ( sum_{i in S_r} L_i ,  f_t(x) - f_t(x_{S_r = baseline}) ),

    Pearson's correlation over the R runs; higher is better, NaN when either side is constant. f_t is
    the target's logit (``softmax=False``, Quantus's default) or probability. Draws: for r = 1..R, for
    b = 1..B, ``rng.choice(H W, subset_size, replace=False)`` (raster pixel indices). Returns (B,)
    float64.

    Quantus 0.6's ``FaithfulnessCorrelation(nr_runs=R, subset_size=.., perturb_baseline=..)``
    (softmax=False) draws its subsets from the C H W single values of the map broadcast over the
    channels, not from pixels: the same for one-channel inputs, where after ``np.random.seed(seed)``
    and with a number as ``perturb_baseline`` (and ``baseline``) its numbers equal ours. With a named
    baseline ("black") Quantus also draws B uniform numbers per run for a fill it does not use, which
    shifts its later subsets away from ours.
    """
    inputs, values, targets = _checked(inputs, maps, targets, batch_size)
    batch, _, height, width = inputs.shape
    runs = positive_int(runs, "runs")
    subset_size = positive_int(subset_size, "subset_size", most=height * width - 1)
    rng = numpy_rng(seed)
    subsets = np.stack(
        [[rng.choice(height * width, subset_size, replace=False) for _ in range(batch)] for _ in range(runs)]
    )
    chosen = torch.zeros(runs, batch, height * width, dtype=torch.bool)
    chosen.scatter_(2, torch.from_numpy(subsets), True)
    chosen = chosen.transpose(0, 1).reshape(batch, runs, 1, height, width)
    mass = (values.flatten(1)[:, None] * chosen.flatten(2).double()).sum(dim=2)
    device = model_device(model)
    x, fill, targets = inputs.to(device), fill_image(inputs, baseline).to(device), targets.to(device)

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield x, targets
        for b in range(batch):
            for start in range(0, runs, batch_size):
                removed = chosen[b, start : start + batch_size].to(device)
                yield torch.where(removed, fill[b], x[b]), targets[b].expand(len(removed))

    with torch.no_grad():
        scores = target_scores(model, images(), softmax=softmax, batch_size=batch_size)
    drops = scores[:batch, None] - scores[batch:].reshape(batch, runs)
    return torch.from_numpy(_pearson(mass.numpy(), drops.numpy()))


def _explained(explain: Explain, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """explain(inputs, targets) as float64 CPU maps (B,H,W) at the inputs' size."""
    result = explain(inputs, targets)
    maps = result if isinstance(result, torch.Tensor) else getattr(result, "maps", None)
    if not isinstance(maps, torch.Tensor):
        raise GradCAMError(f"explain must return maps (B,H,W) or an Explanation, got {type(result).__name__}")
    expected = (len(inputs), *inputs.shape[2:])
    if tuple(maps.shape) != expected:
        raise GradCAMError(f"explain must return maps of shape {expected}, got {tuple(maps.shape)}")
    return map_batch(maps, "explain's maps")


def _own_maps(
    explain: Explain, inputs: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor | None
) -> torch.Tensor:
    if maps is None:
        return _explained(explain, inputs, targets)
    values = map_batch(maps)
    expected = (len(inputs), *inputs.shape[2:])
    if tuple(values.shape) != expected:
        raise GradCAMError(f"maps must be (B,H,W) = {expected} like the inputs, got {tuple(values.shape)}")
    return values


def _explain_inputs(inputs: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise GradCAMError(f"inputs must be a floating (B,C,H,W) tensor, got {shape}")
    targets = torch.as_tensor(targets).reshape(-1)
    if targets.numel() != len(inputs) or targets.is_floating_point():
        raise GradCAMError(f"targets must hold one class per image ({len(inputs)}), got {targets.tolist()}")
    return inputs.detach(), targets.long().to(inputs.device)


def sensitivities(
    explain: Explain,
    inputs: torch.Tensor,
    targets: object,
    *,
    maps: torch.Tensor | None = None,
    samples: int = SAMPLES,
    radius: float = RADIUS,
    relative: bool = True,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""(B, samples) float64: ||Phi(x + delta_s) - Phi(x)||_F (divided by ||Phi(x)||_F when
    ``relative``) for s = 1..``samples``, delta_s uniform on [-radius, radius] in every input value.
    Draws: for s = 1..samples, ``rng.uniform(-radius, radius, size=(B, C H W))``, added in float64 and
    rounded to the inputs' dtype. See :func:`max_sensitivity`."""
    inputs, targets = _explain_inputs(inputs, targets)
    samples = positive_int(samples, "samples")
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not radius > 0:
        raise GradCAMError(f"radius must be a positive number, got {radius!r}")
    original = _own_maps(explain, inputs, targets, maps)
    rng = numpy_rng(seed)
    per_call = max(1, batch_size // len(inputs))
    out = []
    for start in range(0, samples, per_call):
        count = min(per_call, samples - start)
        noise = np.stack(
            [rng.uniform(-radius, radius, size=(len(inputs), inputs[0].numel())) for _ in range(count)]
        )
        shifted = inputs.to("cpu", torch.float64)[None] + torch.from_numpy(noise).reshape(
            count, *inputs.shape
        )
        perturbed = shifted.to(inputs.dtype).to(inputs.device).flatten(0, 1)
        moved = _explained(explain, perturbed, targets.repeat(count)).reshape(count, *original.shape)
        out.append(torch.linalg.vector_norm((moved - original).flatten(2), dim=2).T)
    distances = torch.cat(out, dim=1)
    if not relative:
        return distances
    norms = torch.linalg.vector_norm(original.flatten(1), dim=1)[:, None]
    return torch.where(norms > 0, distances / norms, torch.full_like(distances, float("nan")))


def max_sensitivity(
    explain: Explain,
    inputs: torch.Tensor,
    targets: object,
    *,
    maps: torch.Tensor | None = None,
    samples: int = SAMPLES,
    radius: float = RADIUS,
    relative: bool = True,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Max-sensitivity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, "On the (In)fidelity and Sensitivity
    of Explanations", NeurIPS 2019): the largest change of the explanation under small input noise,

        SENS_max = max_{s = 1..N} ||Phi(x + delta_s) - Phi(x)||_F / ||Phi(x)||_F,

    delta_s uniform on [-r, r] in every input value (the L-inf ball of radius r = ``radius``), N =
    ``samples``, Phi = ``explain`` for the given targets (``maps``: Phi(x) when already computed).
    Lower is better. Yeh et al. define it without the denominator (``relative=False``); Quantus divides
    by ||Phi(x)||, which makes maps of different scales comparable (NaN for an all-zero Phi(x)).
    Returns (B,) float64.

    Quantus 0.6: ``MaxSensitivity(nr_samples=N, lower_bound=r)`` (defaults: uniform noise, difference,
    Frobenius norms, abs=False, normalise=False) with ``explain_func`` returning the same maps, after
    ``np.random.seed(seed)``, draws the same noise and gives the same numbers.
    """
    values = sensitivities(
        explain,
        inputs,
        targets,
        maps=maps,
        samples=samples,
        radius=radius,
        relative=relative,
        seed=seed,
        batch_size=batch_size,
    )
    return values.amax(dim=1)


def avg_sensitivity(
    explain: Explain,
    inputs: torch.Tensor,
    targets: object,
    *,
    maps: torch.Tensor | None = None,
    samples: int = SAMPLES,
    radius: float = RADIUS,
    relative: bool = True,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    r"""Avg-sensitivity (Yeh et al., NeurIPS 2019): the mean change of the explanation under noise,

        SENS_avg = 1/N sum_{s = 1..N} ||Phi(x + delta_s) - Phi(x)||_F / ||Phi(x)||_F,

    with the noise, options and draws of :func:`max_sensitivity`. Lower is better. Returns (B,)
    float64. Quantus 0.6: ``AvgSensitivity(nr_samples=N, lower_bound=r)`` after ``np.random.seed(seed)``.
    """
    values = sensitivities(
        explain,
        inputs,
        targets,
        maps=maps,
        samples=samples,
        radius=radius,
        relative=relative,
        seed=seed,
        batch_size=batch_size,
    )
    return values.mean(dim=1)


def random_logit(
    explain: Explain,
    inputs: torch.Tensor,
    targets: object,
    *,
    num_classes: int,
    maps: torch.Tensor | None = None,
    seed: int = 42,
) -> torch.Tensor:
    r"""Random logit (Sixt, Granz, Landgraf, "When Explanations Lie: Why Many Modified BP Attributions
    Fail", ICML 2020): how similar is the explanation of the target to that of a random other class?

        RL = SSIM( |Phi_t(x)| / max|Phi_t(x)| , |Phi_t'(x)| / max|Phi_t'(x)| ),   t' uniform on the
                                                                               other classes,

    the 2-D SSIM of :func:`gradcam.metrics.ssim` (7x7 window, data range 1; an all-zero map stays
    zero). Lower is better: a class-sensitive method explains another class differently. Draws:
    i = ``rng.randint(0, num_classes - 1, size=B)``, t'_b = i_b + (i_b >= t_b), which picks the same
    classes as Quantus 0.6's ``RandomLogit(num_classes=.., seed=seed)``. Quantus then compares the maps
    flattened to 1-D (a 1-D SSIM of the raster order); we compare them as images, as the paper does.
    Returns (B,) float64.
    """
    inputs, targets = _explain_inputs(inputs, targets)
    classes = positive_int(num_classes, "num_classes")
    if classes < 2 or int(targets.min()) < 0 or int(targets.max()) >= classes:
        raise GradCAMError(
            f"targets must be classes 0..{classes - 1} of num_classes >= 2, got {targets.tolist()}"
        )
    picks = torch.from_numpy(numpy_rng(seed).randint(0, classes - 1, size=len(inputs))).to(targets.device)
    others = picks + (picks >= targets).long()
    first = _own_maps(explain, inputs, targets, maps).abs()
    second = _explained(explain, inputs, others).abs()

    def scaled(values: torch.Tensor) -> torch.Tensor:
        peak = values.flatten(1).amax(dim=1)
        return values / torch.where(peak > 0, peak, torch.ones_like(peak))[:, None, None]

    pairs = zip(scaled(first), scaled(second), strict=True)
    return torch.tensor([ssim(a, b) for a, b in pairs], dtype=torch.float64)
