"""Metrics that test explanations: localisation, pointing game, faithfulness, ROAD, sanity checks.

>>> from gradcam.metrics import boxes_from_map, pointing_hit, deletion, insertion, road_curves
>>> from gradcam.metrics import cascading_randomisation, evaluate, load_annotations

Each function documents its paper and exact protocol; :func:`evaluate` runs them all over an annotated
image folder, beside the baselines of :mod:`gradcam.metrics.baselines`.
"""

from __future__ import annotations

from gradcam.metrics.annotations import Annotation, AnnotationSet, load_annotations
from gradcam.metrics.concentration import complexity, sparseness
from gradcam.metrics.confidence import ConfidenceChange, confidence_change, win_percentage
from gradcam.metrics.evaluation import EvaluationResult, EvaluationSettings, evaluate
from gradcam.metrics.flipping import irof, monotonicity, pixel_flipping, region_perturbation, selectivity
from gradcam.metrics.localization import (
    boxes_from_map,
    iou,
    localization_error,
    localization_hit,
    pointing_hit,
)
from gradcam.metrics.perturbation import Curve, deletion, insertion
from gradcam.metrics.relevance import energy_pointing_game, relevance_mass, relevance_rank, top_k_intersection
from gradcam.metrics.report import write_evaluation
from gradcam.metrics.road import RoadResult, noisy_linear_impute, road_curves
from gradcam.metrics.robustness import (
    avg_sensitivity,
    faithfulness_correlation,
    max_sensitivity,
    random_logit,
)
from gradcam.metrics.saliency import BASELINES, Saliency, make_saliency
from gradcam.metrics.sanity import SanityResult, cascading_randomisation, spearman, ssim

__all__ = [
    "BASELINES",
    "Annotation",
    "AnnotationSet",
    "ConfidenceChange",
    "Curve",
    "EvaluationResult",
    "EvaluationSettings",
    "RoadResult",
    "Saliency",
    "SanityResult",
    "boxes_from_map",
    "cascading_randomisation",
    "confidence_change",
    "deletion",
    "evaluate",
    "insertion",
    "iou",
    "load_annotations",
    "localization_error",
    "localization_hit",
    "noisy_linear_impute",
    "pointing_hit",
    "road_curves",
    "make_saliency",
    "spearman",
    "ssim",
    "win_percentage",
    "write_evaluation",
    "avg_sensitivity",
    "complexity",
    "energy_pointing_game",
    "faithfulness_correlation",
    "irof",
    "max_sensitivity",
    "monotonicity",
    "pixel_flipping",
    "random_logit",
    "region_perturbation",
    "relevance_mass",
    "relevance_rank",
    "selectivity",
    "sparseness",
    "top_k_intersection",
]
