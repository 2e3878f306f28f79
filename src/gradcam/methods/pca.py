"""Projection of feature maps on their first singular vector (Eigen-CAM, eigen_smooth)."""

from __future__ import annotations

import torch


def first_component(features: torch.Tensor, *, center: bool = False) -> torch.Tensor:
    """Project (..., K, h, w) features on their first right singular vector: (..., h, w).

    Each image's features are a matrix M of h*w rows (positions) and K columns (channels); the map is
    M v_1 with v_1 the first right singular vector of M (of M minus its column means when ``center``,
    i.e. the first principal component). The sign of v_1 is arbitrary; it is chosen so that the map
    correlates positively with the plain channel sum, sum_k M[:, k].
    """
    leading = features.shape[:-3]
    channels, height, width = features.shape[-3:]
    flat = features.reshape(-1, channels, height * width)
    matrix = flat.transpose(1, 2).double()
    if center:
        matrix = matrix - matrix.mean(dim=1, keepdim=True)
    _, _, right = torch.linalg.svd(matrix, full_matrices=False)
    projection = matrix @ right[:, 0, :, None]  # (B, h*w, 1)
    reference = flat.sum(dim=1).double()
    sign = torch.sign((projection[..., 0] * (reference - reference.mean(1, keepdim=True))).sum(dim=1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (projection[..., 0] * sign[:, None]).reshape(*leading, height, width).to(features.dtype)
