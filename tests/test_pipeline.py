"""The one explain step (gradcam.pipeline) against references computed here: the classes each image gets
from its own logits, captum's LayerGradCam per row, a guided gradient with a hand-written ReLU rule, and
the forwards counted."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from conftest import GuidedRule, SpatialHead
from gradcam import GradCAMError
from gradcam.pipeline import Explainer, explain


@pytest.fixture
def model() -> SpatialHead:
    torch.manual_seed(0)
    return SpatialHead().double().eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 6, 7, dtype=torch.float64)


def expected_classes(logits: torch.Tensor, named: list[list[int]], topk: list[int]) -> list[list[int]]:
    """The rule written out: the k best, then the named ones, no repeats; the top-1 when neither."""
    out = []
    for b in range(len(logits)):
        order = sorted(range(logits.shape[1]), key=lambda c: -float(logits[b, c]))
        classes = []
        for c in order[: topk[b]] + named[b]:
            if c not in classes:
                classes.append(c)
        out.append(classes or [order[0]])
    return out


def captum_map(model: nn.Module, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return LayerGradCam(model, model.conv).attribute(x, target=classes, relu_attributions=True)[:, 0].detach()


@pytest.mark.parametrize(
    ("targets", "topk"),
    [
        (None, 0),
        (None, 2),
        ([[1], None, [3, 0]], 0),
        ([[1], None, [3, 0]], [1, 0, 2]),
        ([2, 0, 1], 1),  # B ints: one class per image, after each image's top-1
        (3, 0),
    ],
)
def test_each_image_gets_its_own_classes_and_every_row_is_captums_map(model, x, targets, topk) -> None:
    logits = model(x).detach()
    per_image_topk = topk if isinstance(topk, list) else [topk] * 3
    if targets is None:
        named = [[], [], []]
    elif isinstance(targets, int):
        named = [[targets]] * 3
    else:
        named = [t if isinstance(t, list) else ([] if t is None else [t]) for t in targets]
    wanted = expected_classes(logits, named, per_image_topk)

    result = explain(model, x, "gradcam", targets, topk=topk, layer="conv")

    assert [list(w) for w in result.wanted] == wanted
    rows = max(map(len, wanted))
    assert result.ids.tolist() == [[w[min(n, len(w) - 1)] for w in wanted] for n in range(rows)]
    assert result.explanation.raw.shape == (rows, 3, 6, 7)
    probabilities = logits.softmax(dim=1)
    for n in range(rows):
        classes = result.ids[n].tolist()
        torch.testing.assert_close(
            result.explanation.raw[n].double(), captum_map(model, x, classes), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(result.scores[n].double(), logits[range(3), classes], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            result.probs[n].double(), probabilities[range(3), classes], rtol=1e-5, atol=1e-6
        )
    top = probabilities.topk(4, dim=1)
    assert [[i for i, _ in image] for image in result.top(4)] == top.indices.tolist()


def test_all_classes(model, x) -> None:
    result = explain(model, x, "gradcam", "all", layer="conv")
    assert result.wanted == ((0, 1, 2, 3),) * 3 and result.ids.tolist() == [[c] * 3 for c in range(4)]
    for c in range(4):
        torch.testing.assert_close(
            result.explanation.raw[c].double(), captum_map(model, x, [c] * 3), rtol=1e-5, atol=1e-6
        )


def hand_guided(model: SpatialHead, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """dy^c/dx with the guided rule at both ReLUs, written out from the model's own modules."""
    x = x.clone().requires_grad_(True)
    a = GuidedRule.apply(F.conv2d(x, model.conv.weight, model.conv.bias, padding=1))
    head = (GuidedRule.apply(model.mix(a)) * model.where).sum(dim=(2, 3))
    scores = model.fc(head)[range(len(classes)), classes]
    (gradient,) = torch.autograd.grad(scores.sum(), x)
    return gradient


def test_guided_rows_come_from_one_forward_and_guided_gradcam_is_their_product(model, x) -> None:
    seen = {"images": 0}
    handle = model.register_forward_pre_hook(
        lambda module, args: seen.__setitem__("images", seen["images"] + len(args[0]))
    )
    try:
        explainer = Explainer(model, "gradcam", layer="conv", guided=True)
        result = explainer.explain(x, topk=2)
    finally:
        handle.remove()
    assert seen["images"] == 3 + 3  # one forward for the maps and predictions, one guided forward
    for n in range(2):
        classes = result.ids[n].tolist()
        torch.testing.assert_close(result.guided[n], hand_guided(model, x, classes), rtol=1e-7, atol=1e-9)
        maps = result.explanation.maps[n]
        torch.testing.assert_close(result.guided_gradcam()[n], result.guided[n] * maps[:, None].double())
    assert result.pixel_methods() == ["guided-backprop", "guided-gradcam"]


def test_guided_backprop_alone_predicts_from_its_own_forward(model, x) -> None:
    result = explain(model, x, "guided-backprop", [[0, 2], None, None])
    logits = model(x).detach()
    assert result.explanation is None and result.layer is None
    assert result.wanted == ((0, 2), (int(logits[1].argmax()),), (int(logits[2].argmax()),))
    torch.testing.assert_close(
        result.pictures()[1], hand_guided(model, x, result.ids[1].tolist()), rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(
        result.probs.double(), logits.softmax(1).gather(1, result.ids.T).T, rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize(
    ("targets", "topk", "message"),
    [
        ([[1], None], 0, "got targets for 2 images in a batch of 3"),
        ([1, 2], 0, "got targets for 2 images in a batch of 3"),
        ([[9], None, None], 0, "target class 9 is out of range; expected 0..3"),
        (None, 5, "topk must be from 0 to 4"),
        (None, [1, 2], "topk must be an integer or one integer per image"),
        ("every", 0, "targets must be None, 'all'"),
        ([[1.5], None, None], 0, "targets must be integer class indices"),
    ],
)
def test_bad_targets_are_one_line_errors(model, x, targets, topk, message) -> None:
    with pytest.raises(GradCAMError, match=message):
        explain(model, x, "gradcam", targets, topk=topk, layer="conv")


def test_methods_come_from_the_registry(model, x) -> None:
    with pytest.raises(GradCAMError, match=re.escape("method 'gradcam+' not found; available: gradcam")):
        Explainer(model, "gradcam+")
    with pytest.raises(GradCAMError, match="not offered"):
        Explainer(model, "sobel")  # a model-free baseline explains no prediction
    with pytest.raises(GradCAMError, match="guided-backprop explains the input, not a layer"):
        Explainer(model, "guided-backprop", layer="conv")
