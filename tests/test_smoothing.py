"""eigen_smooth, aug_smooth and fused multi-layer maps against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import gradcam
from conftest import SpatialHead
from gradcam.explanation import fuse


def principal_projection(features: np.ndarray) -> np.ndarray:
    """First principal component (centred SVD) of a (K,h,w) stack, sign agreeing with the channel sum."""
    matrix = features.reshape(len(features), -1).T
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    total = matrix.sum(axis=1)
    if np.dot(projection, total - total.mean()) < 0:
        projection = -projection
    return np.maximum(projection.reshape(features.shape[1:]), 0)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_eigen_smooth_is_the_principal_component_of_the_weighted_activations(method: str) -> None:
    torch.manual_seed(2)
    model = SpatialHead().double().eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    A, G = model.reference(x, [1, 2])
    if method == "gradcam":
        weighted = G.mean(axis=(2, 3))[:, :, None, None] * A
    else:
        weighted = np.maximum(G, 0) * A
    expected = np.stack([principal_projection(w) for w in weighted])
    result = gradcam.methods.get(method)(model, "conv")(x, [1, 2], eigen_smooth=True)
    np.testing.assert_allclose(result.raw.double().numpy(), expected, rtol=1e-6, atol=1e-9)
    plain = gradcam.methods.get(method)(model, "conv")(x, [1, 2])
    assert not torch.allclose(plain.raw, result.raw)


def test_aug_smooth_averages_mirrored_and_scaled_passes_mapped_back() -> None:
    model = torchvision.models.resnet18(num_classes=6).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    cam = gradcam.GradCAM(model, "layer3")
    targets = cam(x).targets
    grid = cam(x).raw.shape[-2:]
    passes = []
    for flip in (False, True):
        for scale in (1.0, 1.25):
            image = x.flip(-1) if flip else x
            if scale != 1.0:
                image = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
            raw = cam(image, targets).raw
            back = F.interpolate(raw[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
            passes.append(back.flip(-1) if flip else back)
    expected = torch.stack(passes).mean(dim=0)
    smoothed = cam(x, aug_smooth=True)
    assert smoothed.targets.tolist() == targets.tolist()
    torch.testing.assert_close(smoothed.raw, expected)
    assert smoothed.maps.shape == (2, 64, 64)


def test_fused_map_is_the_maximum_of_normalised_layer_maps() -> None:
    model = torchvision.models.resnet18(num_classes=6).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    layers = ["layer2", "layer3", "layer4"]
    singles = [gradcam.GradCAM(model, name)(x, [3, 1]).raw for name in layers]
    normalised = []
    for raw in singles:
        up = F.interpolate(raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        peak = up.flatten(1).max(1).values.clamp_min(1e-30)
        normalised.append(up / peak[:, None, None])
    expected = torch.stack(normalised).amax(dim=0)
    fused = fuse(gradcam.GradCAM(model, layers)(x, [3, 1]))
    assert fused.layer == "layer2+layer3+layer4"
    torch.testing.assert_close(fused.raw, expected)
    torch.testing.assert_close(fused.maps.amax(dim=(1, 2)), torch.ones(2, dtype=fused.maps.dtype))
    with pytest.raises(ValueError, match="same batch, targets"):
        fuse([gradcam.GradCAM(model, "layer4")(x, [3, 1]), gradcam.GradCAM(model, "layer4")(x, [1, 1])])
