"""gradcam: where an image classifier looked.

Grad-CAM (Selvaraju et al., ICCV 2017) on any PyTorch vision model, exact and with the model left
exactly as found.

    >>> import gradcam
    >>> loaded = gradcam.models.load("efficientnet-lite0")
    >>> batch = loaded.preprocess(gradcam.io.load_image("examples/cat.png"))[None]
    >>> explanation = gradcam.GradCAM(loaded.module)(batch)
    >>> result = gradcam.explain(loaded.module, batch, topk=3)   # the step every front end calls
"""

from gradcam import io, methods, models, pipeline, viz
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.explanation import Explanation
from gradcam.layers import LayerInfo, find_layer, list_layers
from gradcam.methods import (
    ISCAM,
    SSCAM,
    AblationCAM,
    AttentionRollout,
    ClassActivationMap,
    DeepFeatureFactorization,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    GenericAttention,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    KernelPCACAM,
    LayerCAM,
    LeGrad,
    RandomCAM,
    ScoreCAM,
    ShapleyCAM,
    SmoothGradCAMpp,
    XGradCAM,
)
from gradcam.pipeline import Explainer, Result, explain

__version__ = "0.1.0"

__all__ = [
    "AblationCAM",
    "AttentionRollout",
    "ClassActivationMap",
    "DeepFeatureFactorization",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "Explanation",
    "FinerCAM",
    "FullGrad",
    "GenericAttention",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMError",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "ISCAM",
    "ImageLoadError",
    "KernelPCACAM",
    "LayerCAM",
    "LayerInfo",
    "LeGrad",
    "RandomCAM",
    "Result",
    "SSCAM",
    "ScoreCAM",
    "ShapleyCAM",
    "SmoothGradCAMpp",
    "XGradCAM",
    "explain",
    "find_layer",
    "io",
    "list_layers",
    "methods",
    "models",
    "pipeline",
    "viz",
]
