"""What a map explains: class indices of a classifier, or target functions on any model output.

* :mod:`gradcam.targets.classes`: a classifier's classes (indices, names, the logits in an output);
* :mod:`gradcam.targets.functions`: callables output -> (B,) scores (:class:`Segmentation`,
  :class:`Sigmoid`, :class:`Regression`, :class:`Similarity`, or any function);
* :mod:`gradcam.targets.detection`: :class:`Box` and a detector's own :class:`Detections`;
* :mod:`gradcam.targets.contrast`: a class against its most similar classes (Finer-CAM's rows);
* :mod:`gradcam.targets.rows`: the chosen targets of a batch as (N,B) rows, what every method reads.
"""

from gradcam.targets.classes import TargetSpec, model_logits, parse_class, resolve
from gradcam.targets.detection import Box, Detections, detections_of
from gradcam.targets.functions import (
    Regression,
    Segmentation,
    SegmentedClasses,
    Sigmoid,
    Similarity,
    Target,
    part,
)
from gradcam.targets.rows import ClassRows, Rows, Scored, TargetRows

__all__ = [
    "Box",
    "ClassRows",
    "Detections",
    "Regression",
    "Rows",
    "Scored",
    "SegmentedClasses",
    "Segmentation",
    "Sigmoid",
    "Similarity",
    "Target",
    "TargetRows",
    "TargetSpec",
    "detections_of",
    "model_logits",
    "parse_class",
    "part",
    "resolve",
]
