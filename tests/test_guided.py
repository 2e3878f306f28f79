"""Guided Backprop and Guided Grad-CAM against independent references.

References: captum's GuidedBackprop (hooks on nn.ReLU modules), a backward-hook oracle written here for
nn.ReLU / nn.ReLU6 modules, a hand-derived gradient of a small MLP, and captum's LayerGradCam for the
Guided Grad-CAM product.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import LayerGradCam
from torch import nn

import gradcam
from conftest import TinyHead
from test_gradcam import assert_close
from test_model_state import ExplodingHead, assert_same_state, mixed_state_resnet, snapshot


def plain_gradient(model: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    scores = model(leaf).gather(1, torch.tensor(targets)[:, None])
    return torch.autograd.grad(scores.sum(), leaf)[0]


def hooked_guided(model: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Oracle for out-of-place nn.ReLU / nn.ReLU6 modules: their input gradient [0 < x < hi] * g, made
    non-negative by a backward hook, is [0 < x < hi] * relu(g)."""

    def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
        return (grad_input[0].clamp_min(0),)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    handles = [m.register_full_backward_hook(hook) for m in relus]
    try:
        return plain_gradient(model, x, targets)
    finally:
        for handle in handles:
            handle.remove()


def captum_guided(model: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    with warnings.catch_warnings():  # captum announces its hooks and sets requires_grad on its input
        warnings.simplefilter("ignore", UserWarning)
        return CaptumGuidedBackprop(model).attribute(x.clone(), target=targets).detach()


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3 * b.abs().max())


class ModuleNet(nn.Module):
    """Convolutions with ReLU modules, one in place, and max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("name", "size"), [("module-net", 12), ("resnet18", 32), ("vgg11", 32)], ids=lambda v: str(v)
)
def test_equals_captum_on_relu_modules(name: str, size: int) -> None:
    model = {
        "module-net": ModuleNet,
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10),  # in-place ReLUs
        "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    }[name]().eval()
    x = torch.randn(3, 3, size, size)
    targets = [0, 4, 2]
    result = gradcam.GuidedBackprop(model)(x, targets)
    expected = captum_guided(model, x, targets)
    assert result.shape == x.shape and result.device.type == "cpu" and not result.requires_grad
    assert_close(result, expected)
    # The guided rule matters here: the plain input gradient is another answer.
    assert differs(plain_gradient(model, x, targets), expected)
    # Each image explains its own target: another class gives another gradient.
    assert differs(gradcam.GuidedBackprop(model)(x, [1, 1, 1]), expected)


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(7))
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():  # large enough for the last two (ReLU6) activations to reach 6
            self.convs[5].weight.mul_(200)
            self.convs[6].weight.mul_(3)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalNet(Convs):
    """Every ReLU written as a function call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        x = torch.relu(c[0](x))
        x = c[1](x)
        F.relu(x, inplace=True)  # in-place calls used through their side effect, not their result
        x = c[2](x)
        x.relu_()
        x = c[3](x)
        torch.relu_(x)
        x = c[4](x).relu()
        x = F.relu6(c[5](x))
        x = F.hardtanh(c[6](x), 0.0, 6.0)
        return self.head(x)


class ModuleReLUNet(Convs):
    """The same function with nn.ReLU / nn.ReLU6 modules (out of place, for the hook oracle)."""

    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList([*(nn.ReLU() for _ in range(5)), nn.ReLU6(), nn.ReLU6()])
        self.inside_and_above_6: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.acts, strict=True):
            x = conv(x)
            self.inside_and_above_6.append(bool((x > 6).any() and ((x > 0) & (x < 6)).any()))
            x = act(x)
        return self.head(x)


def test_functional_relus_equal_the_module_network() -> None:
    functional = FunctionalNet().double().eval()
    modules = ModuleReLUNet().double().eval()
    modules.load_state_dict(functional.state_dict(), strict=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = [3, 1]
    assert torch.equal(functional(x), modules(x))
    expected = hooked_guided(modules, x, targets)
    assert modules.inside_and_above_6[-2:] == [True, True]  # both sides of the ReLU6 bound are exercised
    assert_close(gradcam.GuidedBackprop(functional)(x, targets), expected)
    assert_close(gradcam.GuidedBackprop(modules)(x, targets), expected)
    # A ReLU left unguided (the peers' result for functional ReLUs) would give another answer.
    assert differs(plain_gradient(functional, x, targets), expected)


def test_closed_form_two_layer_mlp_with_relu_and_relu6() -> None:
    # y = W3 relu6(W2 relu(W1 x + b1) + b2) + b3, with h1, h2 the pre-activations. Guided backprop:
    #   g2 = [0 < h2 < 6] * relu(W3[c]);  g1 = [h1 > 0] * relu(W2^T g2);  dx = W1^T g1
    # (plain backprop has no relu() on the arriving gradients).
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU6(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        model[3].weight.mul_(20)
    w1, b1, w2, b2, w3 = (p.detach() for p in list(model.parameters())[:5])
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    targets = [0, 2, 1, 2]
    h1 = x.flatten(1) @ w1.T + b1
    h2 = torch.relu(h1) @ w2.T + b2
    assert (h2 > 6).any() and ((h2 > 0) & (h2 < 6)).any() and (h1 < 0).any()
    g2 = ((h2 > 0) & (h2 < 6)) * torch.relu(w3[targets])
    g1 = (h1 > 0) * torch.relu(g2 @ w2)
    expected = (g1 @ w1).reshape(x.shape)
    assert_close(gradcam.GuidedBackprop(model)(x, targets), expected, rel=1e-12)
    assert differs(plain_gradient(model, x, targets), expected)


def test_other_activations_keep_their_plain_gradient() -> None:
    class Smooth(Convs):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = self.convs
            x = F.hardtanh(c[1](F.silu(c[0](x))), -1.0, 1.0)
            x = F.leaky_relu(c[3](F.gelu(c[2](x))))
            return self.head(x)

    model = Smooth().eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(gradcam.GuidedBackprop(model)(x, [0, 3]), plain_gradient(model, x, [0, 3]))


def captum_guided_gradcam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]
) -> torch.Tensor:
    """Captum's guided gradients times captum's Grad-CAM, upsampled bilinearly and divided by its max.

    captum's own GuidedGradCam differs from the paper's construction: it upsamples with nearest
    neighbours by default and does not normalise the map, so it is not used as the reference."""
    cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True).detach()
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(dim=1)[:, None, None, None]
    return captum_guided(model, x, targets) * cam / torch.where(peak > 0, peak, 1.0)


def test_guided_gradcam_is_the_product_of_its_parts() -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)  # layer2 maps are 4x4: upsampled to 32x32
    targets = [2, 7, 5]
    cam = gradcam.GradCAM(model, "layer2")(x, targets)
    assert (cam.raw.flatten(1).amax(dim=1) > 0).all()  # no all-zero map: every image is compared
    result = gradcam.GuidedGradCAM(model, "layer2")(x, targets)
    # Against separately computed parts of this library...
    assert torch.equal(result, gradcam.GuidedBackprop(model)(x, targets) * cam.maps[:, None])
    # ... and against captum's.
    expected = captum_guided_gradcam(model, model.layer2, x, targets)
    assert_close(result, expected)
    assert differs(gradcam.GuidedBackprop(model)(x, targets), expected)
    # None explains each image's top-1 class in both factors.
    top1 = model(x).argmax(dim=1).tolist()
    expected = captum_guided_gradcam(model, model.layer2, x, top1)
    assert_close(gradcam.GuidedGradCAM(model, "layer2")(x), expected)


def test_model_state_restored_and_user_hooks_survive() -> None:
    model = mixed_state_resnet()
    fired = []
    model.layer3.register_forward_hook(lambda m, a, o: fired.append("forward"))
    model.fc.register_full_backward_hook(lambda m, gi, go: fired.append("backward"))
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model)
    gradcam.GuidedBackprop(model)(x, [1, 2])
    gradcam.GuidedGradCAM(model, "layer4")(x)
    assert_same_state(before, snapshot(model))
    assert model.bn1.training and not model.layer2.training
    # The user's hooks still fire, and the ReLUs are plain again after the call.
    fired.clear()
    model.eval()
    guided_free = plain_gradient(model, x, [1, 2])
    assert fired == ["forward", "backward"]
    assert differs(guided_free, gradcam.GuidedBackprop(model)(x, [1, 2]))


def test_state_restored_when_the_forward_raises_or_a_target_is_bad() -> None:
    model = ExplodingHead().train()
    model.body.fc.eval()
    model.body.conv.weight.grad = torch.ones_like(model.body.conv.weight)
    before = snapshot(model)
    for method in (gradcam.GuidedBackprop(model), gradcam.GuidedGradCAM(model, "body.conv")):
        with pytest.raises(RuntimeError, match="head failed"):
            method(torch.randn(1, 3, 8, 8))
    assert_same_state(before, snapshot(model))
    resnet = mixed_state_resnet()
    before = snapshot(resnet)
    with pytest.raises(gradcam.GradCAMError, match="out of range"):
        gradcam.GuidedBackprop(resnet)(torch.randn(2, 3, 32, 32), [1, 99])
    assert_same_state(before, snapshot(resnet))
    # No guided rule is left active: a ReLU outside the call has its plain gradient again.
    assert torch.is_grad_enabled()
    z = torch.tensor([-1.0, 2.0], requires_grad=True)
    assert torch.equal(torch.autograd.grad(-torch.relu(z).sum(), z)[0], torch.tensor([0.0, -1.0]))


def test_no_grad_inference_mode_and_frozen_model_give_the_same_result() -> None:
    model = TinyHead(inplace_relu=True).eval()
    x = torch.randn(2, 3, 8, 8)
    reference = gradcam.GuidedGradCAM(model, "conv")(x, [0, 2])
    guided = gradcam.GuidedBackprop(model)(x, [0, 2])
    with torch.no_grad():
        under_no_grad = gradcam.GuidedGradCAM(model, "conv")(x, [0, 2])
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_input = x.clone()
        under_inference = gradcam.GuidedGradCAM(model, "conv")(inference_input, [0, 2])
        guided_under_inference = gradcam.GuidedBackprop(model)(inference_input, [0, 2])
        assert torch.is_inference_mode_enabled()
    outside = gradcam.GuidedGradCAM(model, "conv")(inference_input, [0, 2])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = gradcam.GuidedGradCAM(model, "conv")(x, [0, 2])
    for other in (under_no_grad, under_inference, outside, frozen):
        assert torch.equal(other, reference)
    assert torch.equal(guided_under_inference, guided)
    assert reference.abs().sum() > 0


def test_input_tensor_untouched() -> None:
    # The first operation rewrites its input in place: run on the caller's tensor, it would change it.
    model = nn.Sequential(nn.ReLU(inplace=True), TinyHead()).eval()
    x = torch.randn(2, 3, 8, 8)
    original = x.clone()
    result = gradcam.GuidedBackprop(model)(x)
    assert torch.equal(x, original) and not x.requires_grad and x.grad is None
    assert (result[original < 0] == 0).all() and (result != 0).any()
    leaf = x.clone().requires_grad_(True)
    leaf.grad = torch.full_like(leaf, 7.0)
    gradcam.GuidedBackprop(model)(leaf)
    gradcam.GuidedGradCAM(model, "1.conv")(leaf)
    assert torch.equal(leaf.detach(), original) and leaf.requires_grad
    assert torch.equal(leaf.grad, torch.full_like(leaf, 7.0))


def test_efficientnet_lite_relu6_is_guided() -> None:
    model = gradcam.models.load("efficientnet-lite0", pretrained=False).module
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    targets = [5, 900]
    result = gradcam.GuidedBackprop(model)(x, targets)
    expected = hooked_guided(model, x, targets)
    assert_close(result, expected)
    assert differs(plain_gradient(model, x, targets), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_clear_errors() -> None:
    model = TinyHead().eval()
    with pytest.raises(gradcam.GradCAMError, match="TorchScript"):
        gradcam.GuidedBackprop(torch.jit.script(model))(torch.randn(1, 3, 8, 8))
    with pytest.raises(gradcam.GradCAMError, match="one layer"):
        gradcam.GuidedGradCAM(model, ["conv", "relu"])
    with pytest.raises(gradcam.GradCAMError, match=r"\(B,C,H,W\)"):
        gradcam.GuidedBackprop(model)(torch.randn(3, 8, 8))
    with pytest.raises(gradcam.GradCAMError, match="2 targets for a batch of 1"):
        gradcam.GuidedBackprop(model)(torch.randn(1, 3, 8, 8), [0, 1])
