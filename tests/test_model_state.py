"""The model belongs to the user: every flag, parameter, gradient, buffer and hook is left as found."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import gradcam
from conftest import TinyHead


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for m in model.modules()
        ],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert (old is None and new is None) or torch.equal(old, new)
    for old, new in zip(
        before["params"] + before["buffers"], after["params"] + after["buffers"], strict=True
    ):
        assert torch.equal(old, new)


def mixed_state_resnet() -> nn.Module:
    """resnet18 in train mode with some modules in eval, some parameters frozen, some .grad filled."""
    model = torchvision.models.resnet18(num_classes=10).train()
    model.layer2.eval()
    model.layer4[1].bn2.eval()
    for parameter in model.layer1.parameters():
        parameter.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    return model


def test_state_and_user_hooks_survive_a_call() -> None:
    model = mixed_state_resnet()
    fired = []
    model.layer3.register_forward_hook(lambda m, a, o: fired.append("forward"))
    model.layer3.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    model.fc.register_full_backward_hook(lambda m, gi, go: fired.append("backward"))
    x = torch.randn(2, 3, 64, 64)
    before = snapshot(model)
    gradcam.GradCAM(model, "layer4")(x, [1, 2])
    gradcam.GradCAM(model)(x)
    assert_same_state(before, snapshot(model))
    # BatchNorm ran in eval mode: its running statistics did not move although the model is in train mode.
    assert model.bn1.training
    fired.clear()
    model(x).sum().backward()
    assert fired == ["pre", "forward", "backward"]


class ExplodingHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.body.relu(self.body.conv(x))
        raise RuntimeError("head failed")


def test_state_restored_when_the_forward_raises() -> None:
    model = ExplodingHead().train()
    model.body.fc.eval()
    model.body.conv.weight.grad = torch.ones_like(model.body.conv.weight)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="head failed"):
        gradcam.GradCAM(model, "body.conv")(torch.randn(1, 3, 8, 8))
    assert_same_state(before, snapshot(model))
    assert torch.is_grad_enabled()


def test_state_restored_on_a_bad_target() -> None:
    model = mixed_state_resnet()
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        gradcam.GradCAM(model, "layer4")(torch.randn(2, 3, 64, 64), [1, 99])
    with pytest.raises(ValueError, match="runs more than once"):
        gradcam.GradCAM(model, "layer4.0.relu")(torch.randn(2, 3, 64, 64))
    assert_same_state(before, snapshot(model))


def test_no_grad_inference_mode_and_frozen_model_give_the_same_maps() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = gradcam.GradCAM(model, "layer4")(x, [3, 4]).raw
    with torch.no_grad():
        under_no_grad = gradcam.GradCAM(model, "layer4")(x, [3, 4]).raw
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_input = x.clone()
        under_inference = gradcam.GradCAM(model, "layer4")(inference_input, [3, 4]).raw
        assert torch.is_inference_mode_enabled()
    # An inference tensor used outside inference mode works too.
    outside = gradcam.GradCAM(model, "layer4")(inference_input, [3, 4]).raw
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = gradcam.GradCAM(model, "layer4")(x, [3, 4]).raw
    assert not any(p.requires_grad for p in model.parameters())
    for other in (under_no_grad, under_inference, outside, frozen):
        assert torch.equal(other, reference)
    assert reference.abs().sum() > 0


def test_input_tensor_untouched() -> None:
    model = TinyHead(inplace_relu=True).eval()
    x = torch.randn(2, 3, 8, 8)
    original = x.clone()
    gradcam.GradCAM(model, "conv")(x)
    assert torch.equal(x, original)
    assert not x.requires_grad and x.grad is None
    leading_inplace = nn.Sequential(nn.ReLU(inplace=True), TinyHead()).eval()
    gradcam.GradCAM(leading_inplace, "1.conv")(x)
    assert torch.equal(x, original)
    leaf = torch.randn(1, 3, 8, 8, requires_grad=True)
    gradcam.GradCAM(model, "conv")(leaf)
    assert leaf.grad is None


class Recorder(nn.Module):
    """Identity that records whether autograd was recording when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_grad_enabled(), x.requires_grad))
        return x


def test_no_graph_before_the_layer_and_no_parameter_gradients() -> None:
    before, after = Recorder(), Recorder()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        before,
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        after,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    gradcam.GradCAM(model, "3")(x)
    assert before.seen == [(False, False)]
    assert after.seen == [(True, True)]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "method", [name for name in gradcam.methods.names() if gradcam.methods.get(name).explains_layer]
)
def test_every_method_leaves_the_model_as_found(method: str) -> None:
    """Every layer method on a CNN; the attention methods' own state test is in test_attention.py."""
    model = mixed_state_resnet()
    before = snapshot(model)
    gradcam.methods.get(method)(model, "layer4")(torch.randn(2, 3, 32, 32), [1, 2])
    assert_same_state(before, snapshot(model))
