"""FullGrad against three independent references: the paper's completeness identity (eq. 2) computed by
plain autograd on the parameters, a map derived by hand (tensor hooks, autograd, the formula written out
here), and pytorch-grad-cam's ``FullGrad`` as an oracle; plus the model-state guarantees and the front
ends (registry, pipeline, CLI)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from typer.testing import CliRunner

import gradcam
from conftest import require
from gradcam.errors import GradCAMError
from gradcam.methods import FullGrad, get
from test_model_state import assert_same_state, mixed_state_resnet, snapshot

pgc = require(
    "pytorch_grad_cam", "pytorch-grad-cam's FullGrad is the oracle (the test extra installs grad-cam)"
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

CAT = Path(__file__).resolve().parents[1] / "examples" / "cat.png"


def randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random gamma, beta and running statistics: with the defaults (1, 0, 0, 1) every effective bias is
    0 and the bias terms would vanish, proving nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                k = module.num_features
                module.weight.copy_(0.5 + torch.rand(k, generator=generator))
                module.bias.copy_(torch.randn(k, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(k, generator=generator) * 0.2)
                module.running_var.copy_(0.5 + torch.rand(k, generator=generator))
    return model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batch_norms(torchvision.models.resnet18(num_classes=10), 0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


class SmallNet(nn.Module):
    """Convolutions with biases, a batch norm, ReLUs (one in place), max pooling and a linear head: a
    piecewise-linear network whose second convolution's 5x5 grid is upsampled by a non-integer factor."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def small_net(seed: int = 0, inplace: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_batch_norms(SmallNet(inplace), seed).eval()


# ----------------------------------------------------------------------------- completeness (eq. 2)


def test_decomposition_is_complete_and_matches_plain_autograd() -> None:
    """f(x) = <grad_x f, x> + sum_l <grad_{b_l} f, b_l>, the biases' gradients taken by plain autograd on
    the parameters (a batch norm's effective bias b = beta - mu gamma / sqrt(var + eps) enters its output
    as beta does, so d f / d b = d f / d beta)."""
    model = small_net().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    classes = [2, 0]
    ours = FullGrad(model).decompose(x, classes)

    twin = copy.deepcopy(model)
    leaf = x.clone().requires_grad_(True)
    scores = twin(leaf).gather(1, torch.tensor(classes)[:, None])[:, 0]
    biases = [twin.conv1.bias, twin.bn.bias, twin.conv2.bias, twin.fc.bias]
    bn = twin.bn
    effective = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    values = [twin.conv1.bias, effective, twin.conv2.bias, twin.fc.bias]
    per_image = []
    for b in range(2):  # the parameters are shared by the batch: one image at a time
        grads = torch.autograd.grad(scores[b], [leaf, *biases], retain_graph=True)
        terms = [(grads[0][b] * leaf[b]).sum()] + [
            (g * v).sum() for g, v in zip(grads[1:], values, strict=True)
        ]
        per_image.append(torch.stack(terms).detach())
    reference = torch.stack(per_image)  # (B, 5): input, conv1, bn, conv2, fc
    assert reference[:, 1:].abs().min() > 1e-4  # every bias term counts
    torch.testing.assert_close(reference.sum(1), scores.detach(), rtol=0, atol=1e-12)  # the identity

    assert [name for name, _ in ours.biases] == ["conv1", "bn", "conv2", "fc"]
    mine = torch.stack([ours.input.flatten(1).sum(1)] + [t.flatten(1).sum(1) for _, t in ours.biases], 1)
    torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.scores, scores.detach(), rtol=0, atol=0)
    error = float((ours.total() - ours.scores).abs().max())
    assert error < 1e-12, f"completeness error {error:.1e}"
    torch.testing.assert_close(ours.input, (torch.autograd.grad(scores.sum(), leaf)[0] * x).detach())


def test_decomposition_is_complete_on_a_resnet() -> None:
    """Residual additions, downsampling branches, max and average pooling: still piecewise linear, so the
    input and the batch norms' and head's bias terms sum to the score (float64)."""
    torch.manual_seed(2)
    model = randomise_batch_norms(torchvision.models.resnet18(num_classes=4), 2).double().eval()
    ours = FullGrad(model).decompose(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert len(ours.biases) == 21  # 20 batch norms and the head
    assert abs(float(ours.input.sum())) < 0.9 * abs(float(ours.scores[0]))  # the biases carry a share
    torch.testing.assert_close(ours.total(), ours.scores, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------- a map by hand


def rescale(t: torch.Tensor) -> torch.Tensor:
    """Each (h, w) channel to [0, 1]: minus its minimum, over 1e-7 plus the new maximum."""
    t = t - t.amin(dim=(-2, -1), keepdim=True)
    return t / (1e-7 + t.amax(dim=(-2, -1), keepdim=True))


def hand_map(model: nn.Module, x: torch.Tensor, score) -> torch.Tensor:
    """(B,H,W): psi(|dy/dx * x|) + sum over conv1, bn, conv2 of the upsampled channel sum of
    psi(|dy/dz * b|), gradients caught by tensor hooks on the layers' outputs (non-in-place net)."""
    outputs, grads = {}, {}

    def keep(name: str):
        def hook(module, args, output):
            outputs[name] = output
            output.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    handles = [getattr(model, n).register_forward_hook(keep(n)) for n in ("conv1", "bn", "conv2")]
    leaf = x.clone().requires_grad_(True)
    try:
        y = score(model(leaf))
        y.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    bn = model.bn
    bias = {
        "conv1": model.conv1.bias,
        "bn": bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps),
        "conv2": model.conv2.bias,
    }
    total = rescale((leaf.grad * x).abs()).sum(1)
    for name in ("conv1", "bn", "conv2"):
        term = rescale((grads[name] * bias[name].detach()[:, None, None]).abs())  # (B,K,h,w)
        up = F.interpolate(term, size=x.shape[-2:], mode="bilinear", align_corners=False)  # per channel
        total = total + up.sum(1)
    return total.detach()


def test_map_equals_one_derived_by_hand_for_classes_and_a_target_function() -> None:
    model = small_net(inplace=False)  # the hand derivation's tensor hooks need no in-place ReLU
    x = torch.randn(2, 3, 12, 12)
    ours = FullGrad(model)(x, [1, 2])
    expected = hand_map(copy.deepcopy(model), x, lambda out: out.gather(1, torch.tensor([[1], [2]]))[:, 0])
    assert ours.raw.shape == (2, 12, 12) and ours.raw.min() >= 0
    torch.testing.assert_close(ours.raw, expected, rtol=1e-5, atol=1e-5)
    assert ours.layer == "fullgrad: input + conv1..conv2 (3 biased layers)"

    def contrast(out: torch.Tensor) -> torch.Tensor:
        return out[:, 0] - out[:, 1]

    function = FullGrad(model)(x, contrast)
    torch.testing.assert_close(
        function.raw, hand_map(copy.deepcopy(model), x, contrast), rtol=1e-5, atol=1e-5
    )
    # the in-place ReLU after the batch norm changes nothing: the batch norm's own output is differentiated
    torch.testing.assert_close(FullGrad(small_net(inplace=True))(x, [1, 2]).raw, ours.raw, rtol=0, atol=0)


def test_several_rows_from_one_call_equal_one_row_at_a_time(resnet, images) -> None:
    rows = torch.tensor([[3, 7], [0, 9]])
    together = FullGrad(resnet)(images, rows)
    assert together.raw.shape == (2, 2, 64, 64)
    for n in range(2):
        alone = FullGrad(resnet)(images, rows[n])
        torch.testing.assert_close(together.raw[n], alone.raw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.scores[n], alone.scores)
    assert not torch.allclose(together.raw[0], together.raw[1], atol=1e-2)  # the class matters


# ------------------------------------------------------------------------- pytorch-grad-cam oracle


def pgc_fullgrad(model: nn.Module, x: torch.Tensor, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's FullGrad on a deep copy (it calls backward): its summed map before the final
    min-max (what its aggregate_multi_layers receives, (B,1,H,W)) and its output (B,H,W)."""
    twin = copy.deepcopy(model)
    cam = pgc.FullGrad(model=twin, target_layers=[])
    seen = []
    aggregate = cam.aggregate_multi_layers
    cam.aggregate_multi_layers = lambda per_layer: (seen.append(per_layer.copy()), aggregate(per_layer))[1]
    try:
        output = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    finally:
        cam.activations_and_grads.release()
    return seen[0][:, 0], output


def test_raw_maps_equal_pytorch_grad_cams(resnet, images) -> None:
    """The definitions agree on resnet18 (batch norms only, all biased; the grids 32..2 are upsampled to 64
    by integer factors, where OpenCV's and torch's bilinear resizes are the same half-pixel formula)."""
    ours = FullGrad(resnet)(images, [3, 7])
    raw, output = pgc_fullgrad(resnet, images, [3, 7])
    scale = np.abs(raw).max()
    error = float(np.abs(ours.raw.double().numpy() - raw).max() / scale)
    assert error < 1e-5, f"relative error {error:.2e}"
    low = ours.raw.flatten(1).amin(1)[:, None, None]
    high = (ours.raw - low).flatten(1).amax(1)[:, None, None]
    normalised = ((ours.raw - low) / (1e-7 + high)).numpy()
    np.testing.assert_allclose(normalised, output, rtol=0, atol=1e-5)
    assert ours.raw.shape == (2, 64, 64) and output.std() > 0.05  # not a flat map


def test_non_integer_upsampling_and_conv_biases_equal_pytorch_grad_cams() -> None:
    """Convolutions with biases too, and the second one's 5x5 grid resized by 12/5: OpenCV's float
    bilinear resize and torch's interpolate (align_corners=False) are the same half-pixel formula, so the
    raw maps are equal here as well (the linear head's bias is in neither map)."""
    model = small_net(inplace=False)
    x = torch.randn(2, 3, 12, 12)
    ours = FullGrad(model)(x, [0, 1]).raw.double().numpy()
    raw, _ = pgc_fullgrad(model, x, [0, 1])
    error = float(np.abs(ours - raw).max() / np.abs(raw).max())
    assert error < 1e-5, f"relative error {error:.2e}"


# -------------------------------------------------------------------------------- the model's state


def test_model_left_as_found_with_user_hooks_and_on_errors() -> None:
    model = randomise_batch_norms(mixed_state_resnet(), 1)
    fired = []
    model.layer3.register_forward_hook(lambda m, a, o: fired.append("forward"))
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    kept = x.clone()
    explanation = FullGrad(model)(x, [1, 2])
    assert fired == ["forward"] and explanation.raw.shape == (2, 32, 32)
    assert_same_state(before, snapshot(model))
    assert torch.equal(x, kept) and not x.requires_grad and x.grad is None
    with pytest.raises(GradCAMError):
        FullGrad(model)(x, [1, 99])  # a class the model does not have
    assert_same_state(before, snapshot(model))

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.layer2.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            FullGrad(model)(x, [1, 2])
    finally:
        handle.remove()
    assert_same_state(before, snapshot(model))


def test_no_grad_inference_mode_and_frozen_parameters_give_the_same_map(resnet, images) -> None:
    plain = FullGrad(resnet)(images, [3, 7]).raw
    with torch.no_grad():
        quiet = FullGrad(resnet)(images, [3, 7]).raw
    with torch.inference_mode():
        inferred = FullGrad(resnet)(images, [3, 7]).raw
    frozen = copy.deepcopy(resnet).requires_grad_(False)
    torch.testing.assert_close(quiet, plain, rtol=0, atol=0)
    torch.testing.assert_close(inferred, plain, rtol=0, atol=0)
    torch.testing.assert_close(FullGrad(frozen)(images, [3, 7]).raw, plain, rtol=0, atol=0)
    assert all(p.grad is None for p in resnet.parameters())


def test_refusals_are_one_line() -> None:
    model = small_net()
    x = torch.randn(1, 3, 12, 12)
    cases = [
        (lambda: FullGrad(model, "conv1"), "pass layer=None"),
        (lambda: FullGrad(model, counterfactual=True), "counterfactual"),
        (lambda: FullGrad(model)(x, eigen_smooth=True), "eigen_smooth"),
        (lambda: FullGrad(model)(x, aug_smooth=True), "aug_smooth"),
        (lambda: FullGrad(model)(torch.randn(1, 3, 2, 12, 12)), "(B,C,H,W)"),
    ]
    for call, words in cases:
        with pytest.raises(GradCAMError) as refused:
            call()
        assert words in str(refused.value) and "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------- front ends


def test_registry_pipeline_and_cli(tmp_path: Path, resnet, images) -> None:
    assert get("fullgrad") is FullGrad and "Srinivas & Fleuret" in gradcam.methods.describe("fullgrad")
    result = gradcam.pipeline.explain(resnet, images, "fullgrad", [3, 7])
    torch.testing.assert_close(result.explanation.raw[0], FullGrad(resnet)(images, [3, 7]).raw)

    from gradcam.cli import app

    run = CliRunner().invoke(
        app, ["explain", str(CAT), "--method", "fullgrad", "--out", str(tmp_path), "--json"]
    )
    assert run.exit_code == 0, run.stderr
    files = json.loads(run.stdout)["results"][0]["explanations"][0]["files"]
    loaded = gradcam.models.load()
    batch = loaded.preprocess(gradcam.io.load_image(CAT))[None]
    expected = FullGrad(loaded.module)(batch).raw[0].numpy()
    np.testing.assert_allclose(np.load(files["map"]), expected, rtol=1e-5, atol=1e-6)
