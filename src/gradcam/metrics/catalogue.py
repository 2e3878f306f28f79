"""The metrics ``gradcam evaluate --metrics`` can add to its standard set, each with its better direction.

``standard`` is the evaluation's own set (pointing game, localisation, deletion/insertion, Average
Drop / Increase, ROAD; :mod:`gradcam.metrics.evaluation`). The others are the functions of
:mod:`gradcam.metrics.concentration`, :mod:`~gradcam.metrics.relevance`, :mod:`~gradcam.metrics.flipping`
and :mod:`~gradcam.metrics.robustness` (their docstrings give each formula, paper and the Quantus
settings that reproduce it), called here on one batch of targets with settings sized for an evaluation
run: perturbation curves of about :data:`CURVE_STEPS` steps, regions of 1/:data:`PATCHES_PER_SIDE` of a
side, :data:`SENSITIVITY_SAMPLES` noisy inputs.
Box metrics read each target's annotated boxes on the map laid over the picture (as the pointing game).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradcam.errors import GradCAMError
from gradcam.metrics.concentration import complexity, sparseness
from gradcam.metrics.flipping import irof, monotonicity, pixel_flipping, region_perturbation, selectivity
from gradcam.metrics.relevance import (
    box_masks,
    energy_pointing_game,
    relevance_mass,
    relevance_rank,
    top_k_intersection,
)
from gradcam.metrics.robustness import (
    avg_sensitivity,
    faithfulness_correlation,
    max_sensitivity,
    random_logit,
)

#: The evaluation's own metrics, as one name.
STANDARD = "standard"
#: Steps of the pixel-flipping and monotonicity curves in an evaluation (Quantus's one pixel per step
#: would be H*W forwards per target).
CURVE_STEPS = 64
#: Noisy inputs per target for the sensitivity metrics (Yeh et al. use 50; Quantus's default is 200).
SENSITIVITY_SAMPLES = 10
#: Pixels of top_k_intersection (Quantus's default), at most the frame's.
TOP_K = 1000
#: Region metrics cut each side into this many patches (Quantus's 8x8 patches would be 784 regions of a
#: 224x224 input, one forward each).
PATCHES_PER_SIDE = 8


@dataclass(frozen=True)
class MetricBatch:
    """One batch of targets as a metric reads it."""

    model: nn.Module
    inputs: torch.Tensor  # (T, C, H, W) the model's inputs
    maps: torch.Tensor  # (T, H, W) normalised maps at the input's size
    labels: torch.Tensor  # (T,) the explained classes
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # inputs, labels -> raw maps
    framed: list[torch.Tensor]  # each target's normalised map on its frame (the picture)
    boxes: list[torch.Tensor]  # each target's annotated boxes (n, 4) in its frame's pixels
    classes: int
    seed: int
    batch_size: int


@dataclass(frozen=True)
class Metric:
    """A metric an evaluation can add: its name, whether higher is better, one line with its paper, and
    how it scores a batch (one value per target)."""

    name: str
    higher_is_better: bool
    description: str
    score: Callable[[MetricBatch], torch.Tensor]


def _per_frame(function: Callable[..., torch.Tensor]) -> Callable[[MetricBatch], torch.Tensor]:
    """A box metric on each target's own frame: its map and a mask of its boxes."""

    def score(batch: MetricBatch) -> torch.Tensor:
        values = []
        for framed, boxes in zip(batch.framed, batch.boxes, strict=True):
            height, width = framed.shape
            values.append(function(framed[None], box_masks([boxes], height, width))[0])
        return torch.stack(values)

    return score


def _top_k(framed: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return top_k_intersection(framed, masks, min(TOP_K, framed[0].numel()))


def _energy(batch: MetricBatch) -> torch.Tensor:
    return torch.cat(
        [energy_pointing_game(f[None], [b]) for f, b in zip(batch.framed, batch.boxes, strict=True)]
    )


def _step(batch: MetricBatch) -> int:
    return max(1, math.ceil(batch.maps[0].numel() / CURVE_STEPS))


def _patches(function: Callable[..., torch.Tensor]) -> Callable[[MetricBatch], torch.Tensor]:
    """A region metric with patches of 1/:data:`PATCHES_PER_SIDE` of the side (about 64 regions)."""

    def score(batch: MetricBatch) -> torch.Tensor:
        side = max(1, math.ceil(max(batch.maps.shape[-2:]) / PATCHES_PER_SIDE))
        return function(
            batch.model, batch.inputs, batch.maps, batch.labels, patch_size=side, batch_size=batch.batch_size
        )

    return score


def _irof(batch: MetricBatch) -> torch.Tensor:
    return irof(batch.model, batch.inputs, batch.maps, batch.labels, batch_size=batch.batch_size)


def _flipping(function: Callable[..., torch.Tensor]) -> Callable[[MetricBatch], torch.Tensor]:
    def score(batch: MetricBatch) -> torch.Tensor:
        return function(
            batch.model, batch.inputs, batch.maps, batch.labels, pixels_per_step=_step(batch),
            batch_size=batch.batch_size,
        )  # fmt: skip

    return score


def _sensitivity(function: Callable[..., torch.Tensor]) -> Callable[[MetricBatch], torch.Tensor]:
    def score(batch: MetricBatch) -> torch.Tensor:
        return function(
            batch.explain, batch.inputs, batch.labels, maps=batch.maps, samples=SENSITIVITY_SAMPLES,
            seed=batch.seed, batch_size=batch.batch_size,
        )  # fmt: skip

    return score


def _random_logit(batch: MetricBatch) -> torch.Tensor:
    return random_logit(
        batch.explain, batch.inputs, batch.labels, num_classes=batch.classes, maps=batch.maps, seed=batch.seed
    )


def _faithfulness(batch: MetricBatch) -> torch.Tensor:
    subset = max(1, batch.maps[0].numel() // 224)  # Bhatt et al.: 224 of 224x224, i.e. 1/224 of the pixels
    return faithfulness_correlation(
        batch.model, batch.inputs, batch.maps, batch.labels, subset_size=subset, seed=batch.seed,
        batch_size=batch.batch_size,
    )  # fmt: skip


METRICS: tuple[Metric, ...] = (
    Metric(
        "sparseness",
        True,
        "Gini index of the map (Chalasani et al., ICML 2020)",
        lambda b: sparseness(b.maps),
    ),
    Metric(
        "complexity", False, "entropy of the map (Bhatt et al., IJCAI 2020)", lambda b: complexity(b.maps)
    ),
    Metric(
        "relevance_mass",
        True,
        "share of the map's mass inside the boxes (Arras et al., 2022)",
        _per_frame(relevance_mass),
    ),
    Metric(
        "relevance_rank",
        True,
        "share of the top-|boxes| pixels inside the boxes (Arras et al., 2022)",
        _per_frame(relevance_rank),
    ),
    Metric(
        "top_k_intersection",
        True,
        f"share of the top-{TOP_K} pixels inside the boxes (Theiner et al., 2021)",
        _per_frame(_top_k),
    ),
    Metric(
        "energy_pointing_game", True, "the map's energy inside the boxes (Wang et al., CVPR-W 2020)", _energy
    ),
    Metric(
        "pixel_flipping",
        False,
        "AUC of the target as the most salient pixels go (Bach et al., 2015)",
        _flipping(pixel_flipping),
    ),
    Metric(
        "monotonicity",
        True,
        "the target rises at each added pixel step (Arya et al., 2019)",
        _flipping(monotonicity),
    ),
    Metric(
        "region_perturbation",
        True,
        "AOPC of regions (1/8 of a side) removed most salient first (Samek et al., 2016)",
        _patches(region_perturbation),
    ),
    Metric(
        "selectivity",
        False,
        "AUC as regions (1/8 of a side) go most salient first (Montavon et al., 2018)",
        _patches(selectivity),
    ),
    Metric("irof", True, "area over the curve of SLIC segments removed (Rieger & Hansen, 2020)", _irof),
    Metric(
        "faithfulness_correlation",
        True,
        "Pearson of map sums and score drops of random subsets (Bhatt et al., 2020)",
        _faithfulness,
    ),
    Metric(
        "max_sensitivity",
        False,
        f"largest map change under input noise, {SENSITIVITY_SAMPLES} samples (Yeh et al., 2019)",
        _sensitivity(max_sensitivity),
    ),
    Metric(
        "avg_sensitivity",
        False,
        f"mean map change under input noise, {SENSITIVITY_SAMPLES} samples (Yeh et al., 2019)",
        _sensitivity(avg_sensitivity),
    ),
    Metric(
        "random_logit", False, "SSIM of the map and another class's (Sixt et al., ICML 2020)", _random_logit
    ),
)
_BY_NAME = {metric.name: metric for metric in METRICS}


def names() -> list[str]:
    """``standard`` and every metric's name, in listing order."""
    return [STANDARD, *_BY_NAME]


def get(name: str) -> Metric:
    """The metric named ``name``; a one-line error listing the choices otherwise."""
    if name not in _BY_NAME:
        raise GradCAMError(f"metric '{name}' not found; available: {', '.join(names())}")
    return _BY_NAME[name]


def check(selected: tuple[str, ...]) -> None:
    """Refuse an empty selection or an unknown name, in one line."""
    if not selected:
        raise GradCAMError(f"metrics is empty; name at least one of {', '.join(names())}")
    for name in selected:
        if name != STANDARD:
            get(name)
