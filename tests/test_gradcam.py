"""Grad-CAM's numbers against independent references: hand-derived maps and captum's LayerGradCam."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn

import gradcam
from conftest import TinyHead


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max absolute error within ``rel`` of the reference's largest magnitude."""
    expected = expected.detach().to(actual.dtype)
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual - expected).abs().max()
    assert error <= rel * scale, f"relative error {float(error / scale):.3g} > {rel}"


def captum_map(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    return LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)[:, 0].detach()


class Negated(nn.Module):
    """-f(x): Grad-CAM of -f is the counterfactual map of f, computed by an independent tool."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


def test_closed_form_linear_head() -> None:
    # y^c = sum_k W[c,k] mean_ij A^k_ij + b_c  =>  alpha_k^c = W[c,k] / (h w)
    model = TinyHead(relu=False).double().eval()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    activations = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    weights = model.fc.weight.detach() / (5 * 6)
    for target in (0, 2):
        expected = torch.relu(torch.einsum("k,bkhw->bhw", weights[target], activations))
        result = gradcam.GradCAM(model, "conv")(x, target)
        assert_close(result.raw.double(), expected)
        counterfactual = gradcam.GradCAM(model, "conv", counterfactual=True)(x, target)
        assert_close(
            counterfactual.raw.double(),
            torch.relu(-torch.einsum("k,bkhw->bhw", weights[target], activations)),
        )


def test_conv_followed_by_inplace_relu_uses_the_layer_output() -> None:
    # A = conv output (pre-ReLU). y^c = sum_k W[c,k] mean relu(A^k)
    # => dy/dA^k_ij = W[c,k]/(hw) * [A^k_ij > 0], alpha_k = W[c,k]/(hw) * (#positive in k)/(hw).
    model = TinyHead(inplace_relu=True).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    activations = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    positive_share = (activations > 0).double().mean(dim=(2, 3))
    targets = [0, 1, 2]
    alpha = model.fc.weight.detach()[targets] / 36 * positive_share
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", alpha, activations))
    result = gradcam.GradCAM(model, "conv")(x, targets)
    assert_close(result.raw.double(), expected)
    # captum on the same weights without the in-place ReLU agrees.
    clean = copy.deepcopy(model)
    clean.relu = nn.ReLU(inplace=False)
    assert_close(result.raw.double(), captum_map(clean, clean.conv, x, targets))
    # A stored activation rewritten by the in-place ReLU (the peers' bug) gives another map: this test
    # would catch it.
    rewritten = torch.relu(torch.einsum("bk,bkhw->bhw", alpha, torch.relu(activations)))
    assert (rewritten - expected).abs().max() > 1e-3 * expected.abs().max()


def test_sequential_block_and_batch_of_distinct_targets() -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    targets = [7, 0, 3]
    for name in ("layer3", "layer4"):
        result = gradcam.GradCAM(model, name)(x, targets)
        assert result.layer == name
        assert result.targets.tolist() == targets
        assert_close(result.raw.double(), captum_map(model, model.get_submodule(name), x, targets))


def test_densenet_block_against_captum() -> None:
    model = torchvision.models.densenet121(num_classes=5).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = [4, 1]
    layer = model.features.denseblock3
    result = gradcam.GradCAM(model, layer)(x, targets)
    assert result.layer == "features.denseblock3"
    assert_close(result.raw.double(), captum_map(model, layer, x, targets))


def test_densenet_last_norm_rewritten_by_functional_inplace_relu() -> None:
    # torchvision's DenseNet applies F.relu(features, inplace=True) to features.norm5's output, then pools:
    # alpha_k = W[c,k]/(hw) * (#positive in N^k)/(hw), derived by hand from the head.
    model = torchvision.models.densenet121(num_classes=4).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    seen = {}
    handle = model.features.norm5.register_forward_hook(lambda m, a, out: seen.update(n=out.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    norm = seen["n"]
    area = norm.shape[2] * norm.shape[3]
    targets = [3, 2]
    alpha = model.classifier.weight.detach()[targets] / area * (norm > 0).double().mean(dim=(2, 3))
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", alpha, norm))
    result = gradcam.GradCAM(model, "features.norm5")(x, targets)
    assert_close(result.raw.double(), expected)


def test_counterfactual_equals_gradcam_of_the_negated_model() -> None:
    model = torchvision.models.resnet18(num_classes=6).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = [2, 5]
    result = gradcam.GradCAM(model, "layer4", counterfactual=True)(x, targets)
    negated = Negated(model)
    assert_close(result.raw.double(), captum_map(negated, model.layer4, x, targets))
    plain = gradcam.GradCAM(model, "layer4")(x, targets)
    assert not torch.allclose(plain.raw, result.raw)


def test_float32_matches_captum() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    result = gradcam.GradCAM(model, "layer4")(x, [1, 9])
    assert_close(result.raw, captum_map(model, model.layer4, x, [1, 9]))


def test_scores_probs_targets_and_maps() -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    result = gradcam.GradCAM(model, "layer4")(x)
    assert result.targets.tolist() == logits.argmax(1).tolist()
    assert result.targets.dtype == torch.long
    picked = logits[torch.arange(4), result.targets]
    torch.testing.assert_close(result.scores.double(), picked.float().double())
    torch.testing.assert_close(
        result.probs.double(), logits.softmax(1)[torch.arange(4), result.targets].float().double()
    )
    torch.testing.assert_close(result.logits.double(), logits.float().double())
    assert result.method == "gradcam"
    assert result.maps.shape == (4, 64, 64)
    upsampled = F.interpolate(result.raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    peak = upsampled.flatten(1).max(1).values
    expected = torch.where(peak[:, None, None] > 0, upsampled / peak[:, None, None], upsampled)
    torch.testing.assert_close(result.maps, expected)
    for tensor in (result.raw, result.maps, result.targets, result.scores, result.probs):
        assert tensor.device.type == "cpu" and not tensor.requires_grad


def test_all_zero_map_stays_zero_not_nan() -> None:
    model = TinyHead(relu=False).eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.zero_()
    result = gradcam.GradCAM(model, "conv")(torch.randn(2, 3, 8, 8))
    assert torch.equal(result.raw, torch.zeros(2, 8, 8))
    assert torch.equal(result.maps, torch.zeros(2, 8, 8))


def test_several_layers_from_one_forward_and_one_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    singles = [gradcam.GradCAM(model, name)(x, [1, 2]) for name in ("layer2", "layer4", "layer3")]
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    backward_calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        backward_calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        fused = gradcam.GradCAM(model, ["layer2", model.layer4, "layer3"])(x, [1, 2])
    finally:
        handle.remove()
    assert len(forwards) == 1 and len(backward_calls) == 1
    assert [e.layer for e in fused] == ["layer2", "layer4", "layer3"]
    for single, multiple in zip(singles, fused, strict=True):
        assert_close(multiple.raw, single.raw)


def test_nested_layers_in_one_call() -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    outer, inner = gradcam.GradCAM(model, ["layer4", "layer4.1"])(x, 3)
    # layer4 returns layer4.1's output: the same activation, the same map.
    assert_close(outer.raw, inner.raw)
    assert_close(outer.raw.double(), captum_map(model, model.layer4, x, [3]))


def test_follows_the_input_dtype_and_layer_given_as_module() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    by_module = gradcam.GradCAM(model, model.layer4)(x, 4)
    by_name = gradcam.GradCAM(model, "layer4")(x, 4)
    assert by_module.layer == "layer4"
    assert torch.equal(by_module.raw, by_name.raw)
    # A float64 model and input are explained in float64; every Explanation holds float32 maps, scores,
    # probabilities and logits (and long targets) whatever the input's dtype.
    double = copy.deepcopy(model).double()
    in_double = gradcam.GradCAM(double, "layer4")(x.double(), 4)
    for explained in (by_module, in_double):
        for name in ("raw", "maps", "scores", "probs", "logits"):
            assert getattr(explained, name).dtype == torch.float32, name
        assert explained.targets.dtype == torch.long
    # Computed in float64: within float32 rounding of the float64 reference (a float32 pass is ~1e-5 off).
    reference = captum_map(double, double.layer4, x.double(), [4])
    assert_close(in_double.raw.double(), reference, rel=3e-7)
    assert_close(by_module.raw.double(), reference, rel=1e-4)
    # Guided Backprop returns the input's dtype.
    assert gradcam.GuidedBackprop(double)(x.double(), [4]).dtype == torch.float64
    assert gradcam.GuidedBackprop(model)(x, [4]).dtype == torch.float32


@pytest.fixture
def no_tf32():
    """Full float32 on CUDA for the duration of a test: TF32 convolutions and matrix products (on by
    default for cuDNN on Ampere and later) carry only 10 mantissa bits, about 1e-3 relative error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# A GPU is hardware, not a tool the set-up installs: this skips without one, also under GRADCAM_REQUIRE_ALL=1.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu(no_tf32) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    cpu = gradcam.GradCAM(model, "layer4")(x, [1, 2])
    gpu_model = copy.deepcopy(model).cuda()
    gpu = gradcam.GradCAM(gpu_model, "layer4")(x.cuda(), [1, 2])
    assert gpu.raw.device.type == "cpu"
    assert_close(gpu.raw, cpu.raw, rel=1e-4)


class TapThenInplace(nn.Module):
    """`tap` returns its input; the model then rewrites that tensor in place and uses the tap's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tap = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        tapped = self.tap(y)
        y.relu_()
        return self.fc(tapped.mean(dim=(2, 3)))


def test_output_rewritten_in_place_through_an_alias_is_refused_not_misexplained() -> None:
    # The forward continues on a copy of the layer's output; when the model then rewrites the original
    # through another reference, the copy would change the model's scores: a clear error instead.
    model = TapThenInplace().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="'tap': its output is modified in place later"):
        gradcam.GradCAM(model, "tap")(x, [0, 2])
    assert [m.training for m in model.modules()] == before
    # The convolution that produced the tensor is exact: every later reference is to the forward's copy.
    activations = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    alpha = model.fc.weight.detach()[[0, 2]] / 36 * (activations > 0).double().mean(dim=(2, 3))
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", alpha, activations))
    assert_close(gradcam.GradCAM(model, "conv")(x, [0, 2]).raw.double(), expected)


def test_layer_under_a_second_name_and_parallel_branches_of_a_frozen_model() -> None:
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    model.alias = model.layer4
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    by_alias = gradcam.GradCAM(model, "alias")(x, 2)
    assert by_alias.layer == "alias"
    assert_close(by_alias.raw.double(), captum_map(model, model.layer4, x, [2]))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    branches = ["layer2.0.conv1", "layer2.0.downsample"]  # two branches of one residual block
    together = gradcam.GradCAM(model, branches)(x, 2)
    for name, explanation in zip(branches, together, strict=True):
        assert_close(explanation.raw.double(), captum_map(model, model.get_submodule(name), x, [2]))


def test_numpy_targets_and_models_built_in_inference_mode() -> None:
    model = TinyHead().eval()
    x = torch.randn(2, 3, 6, 6)
    assert gradcam.GradCAM(model, "conv")(x, np.array([2, 0])).targets.tolist() == [2, 0]
    with torch.inference_mode():
        inference_model = TinyHead().eval()
    with pytest.raises(ValueError, match="inference tensors"):
        gradcam.GradCAM(inference_model, "conv")(x)


def test_gradient_stopped_by_the_model_itself_is_explained() -> None:
    class FrozenBackbone(TinyHead):
        def forward(self, x):
            with torch.no_grad():
                features = self.conv(x)
            return self.fc(self.pool(features).flatten(1))

    with pytest.raises(ValueError, match=r"no gradient reaches layer 'conv'.*torch.no_grad\(\)"):
        gradcam.GradCAM(FrozenBackbone().eval(), "conv")(torch.randn(1, 3, 6, 6))
