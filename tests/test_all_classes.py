"""Maps for every class (or each image's top-k) from one forward and batched backwards, equal to the
one-class-at-a-time results."""

from __future__ import annotations

import pytest
import torch
import torchvision

import gradcam
from gradcam.methods import base, get


def assert_rows_match(many: gradcam.Explanation, model, layer, x, method: str) -> None:
    for row in range(many.targets.shape[0]):
        single = get(method)(model, layer)(x, many.targets[row].tolist())
        scale = single.raw.abs().max().clamp_min(1e-12)
        assert (many.raw[row] - single.raw).abs().max() <= 1e-5 * scale, (method, row)
        torch.testing.assert_close(many.scores[row], single.scores)
        torch.testing.assert_close(many.probs[row], single.probs)


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"]
)
def test_all_classes_equal_single_class_results(method: str) -> None:
    model = torchvision.models.resnet18(num_classes=7).double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    many = get(method)(model, "layer3")(x, "all")
    assert many.raw.shape == (7, 3, 4, 4)
    assert many.targets.tolist() == [[c] * 3 for c in range(7)]
    assert many.maps.shape == (7, 3, 64, 64)
    assert_rows_match(many, model, "layer3", x, method)


def test_topk_gives_each_images_best_classes_in_order() -> None:
    model = torchvision.models.resnet18(num_classes=12).double().eval()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    many = gradcam.GradCAM(model, "layer4")(x, topk=3)
    assert many.targets.tolist() == logits.topk(3, dim=1).indices.T.tolist()
    assert_rows_match(many, model, "layer4", x, "gradcam")
    with pytest.raises(ValueError, match="topk must be an integer from 1 to 12"):
        gradcam.GradCAM(model, "layer4")(x, topk=13)
    with pytest.raises(ValueError, match="targets or topk, not both"):
        gradcam.GradCAM(model, "layer4")(x, 1, topk=2)


def test_chunked_and_row_by_row_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torchvision.models.resnet18(num_classes=9).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reference = gradcam.GradCAMPlusPlus(model, ["layer3", "layer4"])(x, "all")
    monkeypatch.setattr(base, "GRADIENT_CHUNK_ELEMENTS", 1)  # one target row per backward
    real_grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    fallback = gradcam.GradCAMPlusPlus(model, ["layer3", "layer4"])(x, "all")
    for a, b in zip(reference, fallback, strict=True):
        torch.testing.assert_close(a.raw, b.raw)


def test_class_agnostic_methods_and_bundled_model_topk() -> None:
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    eigen = gradcam.EigenCAM(model, "layer4")(x, "all")
    assert torch.equal(eigen.raw[0], eigen.raw[4])
    torch.testing.assert_close(eigen.raw[2], gradcam.EigenCAM(model, "layer4")(x).raw)
    lite = gradcam.models.load("efficientnet-lite0", pretrained=False).module
    batch = torch.randn(2, 3, 224, 224)
    many = gradcam.GradCAM(lite)(batch, topk=2)
    assert_rows_match(many, lite, "_bn1", batch, "gradcam")
