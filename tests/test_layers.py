"""The automatic layer choice, layer listing and layer errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import gradcam
from conftest import TinyHead


class SharedActivation(nn.Module):
    """conv -> bn -> act -> conv -> bn -> act, the same `act` module twice (as EfficientNet's _swish)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_resnet_picks_the_last_stage() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert gradcam.find_layer(model, torch.randn(1, 3, 64, 64)) == "layer4"


def test_shared_module_is_never_picked_and_is_refused_when_named() -> None:
    model = SharedActivation().eval()
    x = torch.randn(1, 3, 12, 12)
    infos = {info.name: info for info in gradcam.list_layers(model, x)}
    assert infos["act"].calls == 2 and not infos["act"].is_candidate
    assert gradcam.find_layer(model, x) == "bn2"
    with pytest.raises(ValueError, match="'act' runs more than once"):
        gradcam.GradCAM(model, "act")(x)


def test_bundled_efficientnet_skips_its_shared_swish() -> None:
    module = gradcam.models.load("efficientnet-lite0", pretrained=False).module
    x = torch.zeros(1, 3, 224, 224)
    infos = {info.name: info for info in gradcam.list_layers(module, x)}
    assert infos["_swish"].calls == 2
    assert gradcam.find_layer(module, x) == "_bn1"
    assert infos["_bn1"].output_shape == (1, 1280, 7, 7)


def test_listing_is_in_execution_order_with_shapes() -> None:
    model = TinyHead().eval()
    infos = gradcam.list_layers(model, torch.randn(2, 3, 5, 5))
    assert [(i.name, i.output_shape, i.calls) for i in infos] == [
        ("conv", (2, 4, 5, 5), 1),
        ("relu", (2, 4, 5, 5), 1),
        ("pool", (2, 4, 1, 1), 1),
        ("fc", (2, 3), 1),
    ]
    assert gradcam.find_layer(model, torch.randn(2, 3, 5, 5)) == "relu"


def test_no_spatial_layer_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="pass layer= explicitly"):
        gradcam.find_layer(model, torch.randn(1, 3, 2, 2))


def test_layer_errors_name_the_layer_and_what_was_expected() -> None:
    model = TinyHead().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"layer 'layer5' not found; candidates.*fc"):
        gradcam.GradCAM(model, "layer5")
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape \(1, 3\): expected \(B,C,h,w\)"):
        gradcam.GradCAM(model, "fc")(x)
    with pytest.raises(ValueError, match="not a submodule"):
        gradcam.GradCAM(model, nn.Conv2d(1, 1, 1))
    unused = TinyHead()
    unused.spare = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="'spare' did not run"):
        gradcam.GradCAM(unused, "spare")(x)
    with pytest.raises(ValueError, match="layer list is empty"):
        gradcam.GradCAM(model, [])
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
