"""The CAM family against formulas evaluated independently in numpy, on activations and gradients
taken by plain autograd on a hand-written forward (no hooks, no engine code)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import gradcam
from conftest import SpatialHead
from gradcam.methods import get, names

RELATIVE = 1e-5


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


def expected_map(method: str, A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Each paper's formula, written with explicit loops over images and channels."""
    out = []
    for a, g in zip(A, G, strict=True):  # a, g: (K,h,w)
        if method == "gradcam":
            m = sum(g[k].mean() * a[k] for k in range(len(a)))
        elif method == "gradcam++":
            m = 0
            for k in range(len(a)):
                num = g[k] ** 2
                den = 2 * g[k] ** 2 + a[k].sum() * g[k] ** 3
                alpha = np.where(den != 0, num / np.where(den != 0, den, 1), 0)
                m = m + (alpha * relu(g[k])).sum() * a[k]
        elif method == "xgradcam":
            m = sum((a[k] / a[k].sum() * g[k]).sum() * a[k] for k in range(len(a)) if a[k].sum() != 0)
        elif method == "hirescam":
            m = sum(g[k] * a[k] for k in range(len(a)))
        elif method == "layercam":
            m = sum(relu(g[k]) * a[k] for k in range(len(a)))
        elif method in ("eigencam", "eigengradcam"):
            f = a if method == "eigencam" else g * a
            matrix = f.reshape(len(f), -1).T  # (h*w, K)
            _, _, vt = np.linalg.svd(matrix, full_matrices=False)
            projection = matrix @ vt[0]
            channel_sum = matrix.sum(axis=1)
            if np.dot(projection, channel_sum - channel_sum.mean()) < 0:
                projection = -projection
            m = projection.reshape(f.shape[1:])
        else:
            raise AssertionError(method)
        out.append(relu(m))
    return np.stack(out)


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam"]
)
def test_formula_against_an_independent_evaluation(method: str) -> None:
    torch.manual_seed(1)
    model = SpatialHead().double().eval()
    x = torch.randn(3, 3, 6, 7, dtype=torch.float64)
    targets = [0, 3, 1]
    A, G = model.reference(x, targets)
    expected = expected_map(method, A, G)
    result = get(method)(model, "conv")(x, targets)
    assert result.method == method
    assert result.targets.tolist() == targets
    error = np.abs(result.raw.double().numpy() - expected).max()
    assert error <= RELATIVE * np.abs(expected).max(), (
        f"{method}: relative error {error / np.abs(expected).max()}"
    )
    assert expected.max() > 0


def test_the_methods_really_differ_on_this_network() -> None:
    # If the network made every gradient uniform, most formulas would coincide and the test above could
    # not tell them apart.
    torch.manual_seed(1)
    model = SpatialHead().double().eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    maps = {
        m: expected_map(m, *model.reference(x, [0, 3]))
        for m in ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
    }
    values = list(maps.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not np.allclose(values[i], values[j], rtol=1e-3)


def test_registry_lists_every_method_by_cli_name() -> None:
    assert {
        "gradcam",
        "gradcam++",
        "xgradcam",
        "hirescam",
        "layercam",
        "eigencam",
        "eigengradcam",
        "randomcam",
    } <= set(names())
    assert get("gradcam++") is gradcam.GradCAMPlusPlus
    with pytest.raises(ValueError, match=re.escape("method 'gradcam+' not found; available: gradcam")):
        get("gradcam+")


def test_eigencam_is_class_agnostic_and_refuses_counterfactual() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    first = gradcam.EigenCAM(model, "layer4")(x, [1, 2])
    second = gradcam.EigenCAM(model, "layer4")(x, [7, 0])
    assert torch.equal(first.raw, second.raw)
    with pytest.raises(ValueError, match="counterfactual maps need gradients"):
        gradcam.EigenCAM(model, "layer4", counterfactual=True)


def test_random_cam_is_seeded_and_uses_the_layer_activations() -> None:
    model = SpatialHead().double().eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    one = gradcam.RandomCAM(model, "conv", seed=3)(x)
    two = gradcam.RandomCAM(model, "conv", seed=3)(x)
    other = gradcam.RandomCAM(model, "conv", seed=4)(x)
    assert torch.equal(one.raw, two.raw) and not torch.equal(one.raw, other.raw)
    weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    A = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    torch.testing.assert_close(one.raw.double(), torch.relu(torch.einsum("bk,bkhw->bhw", weights, A)))


@pytest.mark.parametrize("method", ["gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"])
def test_batch_of_distinct_targets_equals_one_image_at_a_time(method: str) -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    together = get(method)(model, "layer3")(x, [4, 1, 9])
    for row, target in enumerate([4, 1, 9]):
        alone = get(method)(model, "layer3")(x[row : row + 1], target)
        torch.testing.assert_close(together.raw[row], alone.raw[0], rtol=1e-6, atol=1e-9)
