"""Argument checks the metrics share."""

from __future__ import annotations

import numpy as np
import torch

from gradcam.errors import GradCAMError


def as_map(saliency: torch.Tensor | np.ndarray, name: str = "map") -> np.ndarray:
    """A non-empty, finite 2-D (H, W) map as a float64 numpy array, or a GradCAMError naming ``name``."""
    if isinstance(saliency, torch.Tensor):
        saliency = saliency.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(saliency, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise GradCAMError(f"{name} must be a non-empty 2-D (H, W) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise GradCAMError(f"{name} holds NaN or infinite values")
    return array
