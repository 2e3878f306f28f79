"""Targets: None, an int, a sequence or a tensor of B ints; names on the command line; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradcam
from conftest import TinyHead
from gradcam.errors import GradCAMError
from gradcam.targets import parse_class


@pytest.fixture
def setup():
    model = TinyHead(classes=5).eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        logits = model(x)
    return gradcam.GradCAM(model, "conv"), x, logits


def test_accepted_forms(setup) -> None:
    cam, x, logits = setup
    assert cam(x).targets.tolist() == logits.argmax(1).tolist()
    assert cam(x, 4).targets.tolist() == [4, 4, 4]
    assert cam(x, np.int64(2)).targets.tolist() == [2, 2, 2]
    assert cam(x, [0, 1, 2]).targets.tolist() == [0, 1, 2]
    assert cam(x, (4, 3, 2)).targets.tolist() == [4, 3, 2]
    assert cam(x, torch.tensor([1, 1, 0])).targets.tolist() == [1, 1, 0]
    same = cam(x, [0, 1, 2])
    per_image = [cam(x[i : i + 1], t).raw[0] for i, t in enumerate([0, 1, 2])]
    for row, single in enumerate(per_image):
        torch.testing.assert_close(same.raw[row], single)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([0, 1], "got 2 targets for a batch of 3 images; expected 3"),
        ([0, 1, 2, 3], "got 4 targets for a batch of 3 images"),
        (torch.tensor([0, 1]), "got 2 targets"),
        (5, r"target class 5 is out of range; expected 0..4"),
        ([0, -1, 2], "target class -1 is out of range"),
        (True, "class indices"),
        ([0.5, 1, 2], "integer class indices"),
        (torch.tensor([0.0, 1.0, 2.0]), "1-D integer"),
        ("cat", "targets must be None"),
    ],
)
def test_bad_targets(setup, targets, message) -> None:
    cam, x, _ = setup
    with pytest.raises(ValueError, match=message):
        cam(x, targets)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (torch.randn(3, 6, 6), r"float tensor \(B,C,H,W\) or \(B,C,T,H,W\).*got shape \(3, 6, 6\)"),
        (torch.zeros(1, 3, 6, 6, dtype=torch.uint8), "got dtype torch.uint8"),
        (np.zeros((1, 3, 6, 6), dtype=np.float32), "got ndarray"),
        (torch.zeros(0, 3, 6, 6), "empty batch"),
    ],
)
def test_bad_inputs(setup, inputs, message) -> None:
    cam, _, _ = setup
    with pytest.raises(ValueError, match=message):
        cam(inputs)


def test_model_must_return_logits() -> None:
    class Dict(TinyHead):
        def forward(self, x):
            return {"out": super().forward(x)}

    refused = r"model returned dict with keys out; expected logits \(B, classes\)"
    with pytest.raises(ValueError, match=refused):
        gradcam.GradCAM(Dict().eval(), "conv")(torch.randn(1, 3, 6, 6))


def test_parse_class_by_index_and_name() -> None:
    labels = ["tabby", "tiger cat", "Egyptian cat"]
    assert parse_class("2", labels) == 2
    assert parse_class("Tiger Cat", labels) == 1
    with pytest.raises(ValueError, match="out of range; expected 0..2"):
        parse_class("3", labels)
    with pytest.raises(ValueError, match="did you mean 'Egyptian cat'"):
        parse_class("egyptian cta", labels)


def test_parse_class_prefers_the_exact_name_and_refuses_ambiguity() -> None:
    labels = ["Cardigan", "cardigan", "tabby"]
    assert parse_class("cardigan", labels) == 1
    assert parse_class("Cardigan", labels) == 0
    assert parse_class("TABBY", labels) == 2
    with pytest.raises(ValueError, match=r"ambiguous: 'Cardigan' \(0\), 'cardigan' \(1\)"):
        parse_class("CARDIGAN", labels)


@pytest.mark.parametrize("spec", ["--1", "²", "1" * 5000, "x" * 500, "٣"])
def test_parse_class_refuses_odd_numbers_and_long_text_with_one_line(spec: str) -> None:
    with pytest.raises(GradCAMError) as excinfo:
        parse_class(spec, ["cat", "dog", "tabby"])
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 300
