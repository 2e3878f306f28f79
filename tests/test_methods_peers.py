"""The methods the peers ship, each against an independent reference: the formula evaluated in numpy on
activations and gradients taken by plain autograd (no hooks, no engine code), and the peer's own
implementation as an oracle (pytorch-grad-cam, torchcam), compared on raw maps at the layer's resolution.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import gradcam
from conftest import SpatialHead, require
from gradcam.errors import GradCAMError
from gradcam.methods import get

pgc = require("pytorch_grad_cam", "the peers' methods are the oracles (the test extra installs grad-cam)")
torchcam = require("torchcam", "the peers' methods are the oracles (the test extra installs torchcam)")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from torchcam import methods as torchcam_methods  # noqa: E402

RELATIVE = 1e-5


def assert_close(ours: torch.Tensor, expected: np.ndarray | torch.Tensor, what: str) -> float:
    """Equal to 1e-5 relative to the reference's peak; the relative error."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.abs(expected).max()
    assert scale > 0, f"{what}: the reference is all zero, the comparison would prove nothing"
    error = float(np.abs(ours.double().numpy() - expected).max() / scale)
    assert error <= RELATIVE, f"{what}: relative error {error:.2e}"
    return error


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


def pgc_raw(kind, model: nn.Module, layer: str, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """pytorch-grad-cam's cam at the layer's resolution (its own get_cam_image on what it captured, then
    np.maximum(cam, 0) as its compute_cam_per_layer), on a deep copy of the model (it calls backward)."""
    twin = copy.deepcopy(model)
    cam = kind(model=twin, target_layers=[twin.get_submodule(layer)])
    try:
        targets = [ClassifierOutputTarget(c) for c in classes]
        cam(input_tensor=x, targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(x, cam.target_layers[0], targets, acts, grads, False), 0)
    finally:
        cam.activations_and_grads.release()


# ------------------------------------------------------------------------------ element-wise Grad-CAM


def test_elementwise_gradcam_is_its_formula_and_pytorch_grad_cams(resnet, images) -> None:
    torch.manual_seed(2)
    model = SpatialHead().double().eval()
    x = torch.randn(3, 3, 6, 7, dtype=torch.float64)
    targets = [0, 3, 1]
    A, G = model.reference(x, targets)
    expected = np.maximum(np.maximum(A * G, 0).sum(axis=1), 0)
    ours = get("gradcam-elementwise")(model, "conv")(x, targets)
    assert ours.method == "gradcam-elementwise"
    assert_close(ours.raw, expected, "formula")
    hires = get("hirescam")(model, "conv")(x, targets)
    assert not torch.allclose(ours.raw, hires.raw), "on this network the clipping must matter"

    classes = [3, 7]
    ours = get("gradcam-elementwise")(resnet, "layer4")(images, classes)
    theirs = pgc_raw(pgc.GradCAMElementWise, resnet, "layer4", images, classes)
    error = assert_close(ours.raw, theirs, "vs pytorch-grad-cam")
    print(f"gradcam-elementwise vs pytorch-grad-cam: {error:.1e}")
    counter = get("gradcam-elementwise")(resnet, "layer4", counterfactual=True)(images, classes)
    assert not torch.equal(counter.raw, ours.raw) and bool((counter.raw >= 0).all())


# -------------------------------------------------------------------------------------------- CAM


def test_cam_is_the_classifiers_weights_on_the_layer_and_torchcams(resnet, images) -> None:
    classes = [3, 7]
    ours = get("cam")(resnet, "layer4")(images, classes)
    # By hand: the fc rows of the classes on layer4's activations (a forward of the model's own parts).
    with torch.no_grad():
        stem = nn.Sequential(*list(resnet.children())[:-2])
        activations = stem(images)
        by_hand = torch.relu(torch.einsum("bk,bkhw->bhw", resnet.fc.weight[classes], activations))
    assert_close(ours.raw, by_hand.numpy(), "by hand")
    # torchcam's CAM on the same weights, not normalised.
    twin = copy.deepcopy(resnet)
    with torchcam_methods.CAM(twin, "layer4", "fc", input_shape=(3, 64, 64)) as extractor:
        with torch.no_grad():
            scores = twin(images)
        [theirs] = extractor(class_idx=classes, scores=scores, normalized=False)
    assert bool((theirs < 0).any())  # torchcam's CAM is the paper's eq. 2, before the ReLU we keep
    error = assert_close(ours.raw, np.maximum(theirs.numpy(), 0), "vs torchcam")
    print(f"cam vs torchcam: {error:.1e}")
    # Grad-CAM, section 3.1: where CAM applies, Grad-CAM's weights are w / Z, its map CAM's / (h w).
    grad = get("gradcam")(resnet, "layer4")(images, classes)
    h, w = ours.raw.shape[-2:]
    assert_close(grad.raw * (h * w), ours.raw.numpy(), "gradcam x hw")
    assert torch.isclose(ours.probs, grad.probs).all() and torch.equal(ours.targets, grad.targets)


def test_cam_refuses_a_head_that_is_not_pooling_then_linear_in_one_line() -> None:
    model = SpatialHead().eval()  # position-weighted sum, not an average pool: CAM does not apply
    with pytest.raises(GradCAMError) as refused:
        get("cam")(model, "mix")(torch.rand(2, 3, 6, 7), [0, 1])
    message = str(refused.value)
    assert "\n" not in message and "global average pool of 'mix'" in message and "gradcam" in message
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(GradCAMError, match="global average pool of 'layer3'"):
        get("cam")(resnet, "layer3")(torch.rand(1, 3, 64, 64), [0])  # a layer before the last stage
    with pytest.raises(GradCAMError, match="class indices"):
        get("cam")(resnet, "layer4")(torch.rand(1, 3, 64, 64), targets=lambda out: out[:, 0] - out[:, 1])


def test_cam_is_in_the_registry_and_explains_through_the_pipeline() -> None:
    names = gradcam.methods.names()
    assert {"cam", "gradcam-elementwise"} <= set(names)
    assert "Zhou et al., CVPR 2016" in gradcam.methods.describe("cam")


# ---------------------------------------------------------------------------------------- KPCA-CAM


def kernel_pc(positions: np.ndarray, gamma: float) -> np.ndarray:
    """The first kernel principal component in closed form: the centred sigmoid kernel's top eigenvector
    u_1 times sqrt(lambda_1) (Schölkopf et al. 1998), by numpy's eigh (not scikit-learn)."""
    kernel = np.tanh(gamma * positions @ positions.T + 1)
    n = len(kernel)
    ones = np.full((n, n), 1 / n)
    centred = kernel - ones @ kernel - kernel @ ones + ones @ kernel @ ones
    values, vectors = np.linalg.eigh(centred)
    return vectors[:, -1] * np.sqrt(values[-1])


def test_kpcacam_is_the_kernel_principal_component_and_pytorch_grad_cams(resnet, images) -> None:
    with torch.no_grad():
        activations = nn.Sequential(*list(resnet.children())[:-2])(images).double().numpy()
    ours = get("kpcacam")(resnet, "layer4")(images, [3, 7])
    twin = copy.deepcopy(resnet)
    cam = pgc.KPCA_CAM(model=twin, target_layers=[twin.layer4])
    try:
        cam(input_tensor=images, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
        theirs = cam.get_cam_image(
            images, twin.layer4, None, cam.activations_and_grads.activations[0].numpy(), None, False
        )
    finally:
        cam.activations_and_grads.release()
    for b, a in enumerate(activations):
        positions = a.reshape(len(a), -1).T
        positions = positions - positions.mean(axis=0)
        by_hand = kernel_pc(positions, 1 / len(a))
        channel_sum = a.sum(axis=0).flatten()
        sign = 1.0 if (by_hand * (channel_sum - channel_sum.mean())).sum() >= 0 else -1.0
        expected = np.maximum(sign * by_hand, 0).reshape(a.shape[1:])
        assert_close(ours.raw[b], expected, f"image {b} by hand")
        # pytorch-grad-cam keeps scikit-learn's sign: equal to ours up to that sign, before the ReLU
        theirs_signed = np.sign((theirs[b].flatten() * sign * by_hand).sum()) * theirs[b]
        error = assert_close(
            ours.raw[b], np.maximum(theirs_signed * 1.0, 0), f"image {b} vs pytorch-grad-cam"
        )
        print(f"kpcacam vs pytorch-grad-cam, image {b}: {error:.1e}")
    torch.testing.assert_close(ours.raw, get("kpcacam")(resnet, "layer4")(images, [0, 0]).raw)  # no class


# ---------------------------------------------------------------------------------------- Finer-CAM


def test_finercam_is_gradcam_of_the_contrast_and_pytorch_grad_cams(resnet, images) -> None:
    with torch.no_grad():
        logits = resnet(images)
    top = logits.argmax(dim=1)
    nearest = torch.argsort((logits - logits.gather(1, top[:, None])).abs(), dim=1, stable=True)[:, 1:4]

    def contrast(out: torch.Tensor) -> torch.Tensor:  # the paper's score, written out per image
        p = out.softmax(dim=1)
        rows = torch.arange(len(out))[:, None]
        w, others = p[rows, nearest], out[rows, nearest]
        return (w * (out.gather(1, top[:, None]) - 1.0 * others)).sum(1) / (w.sum(1) + 1e-9)

    ours = get("finercam")(resnet, "layer4")(images)
    assert ours.targets.tolist() == top.tolist() and ours.method == "finercam"
    by_contrast = get("gradcam")(resnet, "layer4")(images, targets=contrast)
    assert_close(ours.raw, by_contrast.raw.numpy(), "Grad-CAM of the contrast")
    assert_close(ours.scores, contrast(logits).numpy(), "scores")
    assert not torch.allclose(ours.raw, get("gradcam")(resnet, "layer4")(images).raw, rtol=1e-2)

    twin = copy.deepcopy(resnet)
    finer = pgc.FinerCAM(model=twin, target_layers=[twin.layer4])
    try:
        finer(input_tensor=images, targets=None, alpha=1.0)
        found = finer.base_cam.activations_and_grads
        acts, grads = found.activations[0].numpy(), found.gradients[0].numpy()
        theirs = np.maximum(finer.base_cam.get_cam_image(images, twin.layer4, None, acts, grads, False), 0)
    finally:
        found.release()
    error = assert_close(ours.raw, theirs, "vs pytorch-grad-cam")
    print(f"finercam vs pytorch-grad-cam: {error:.1e}")
    # alpha = 0: y = y^c sum p / (sum p + 1e-9), whose gradient is Grad-CAM's to within 1e-9 / sum p
    plain = get("finercam")(resnet, "layer4", alpha=0.0)(images)
    grad = get("gradcam")(resnet, "layer4")(images).raw
    torch.testing.assert_close(plain.raw, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))
    with pytest.raises(GradCAMError, match="compared must be ranks"):
        get("finercam")(resnet, "layer4", compared=(0, 1))(images)
    with pytest.raises(GradCAMError, match="class indices"):
        get("finercam")(resnet, "layer4")(images, targets=lambda out: out[:, 0])


# -------------------------------------------------------------------------------------- Shapley-CAM


def raw_of(cam, x: torch.Tensor, targets: list) -> np.ndarray:
    """A pytorch-grad-cam method's map at the layer's resolution: what its get_cam_image returned inside
    the call, then np.maximum(cam, 0) as its compute_cam_per_layer."""
    recorded = []
    original = cam.get_cam_image
    cam.get_cam_image = lambda *args, **kwargs: recorded.append(original(*args, **kwargs)) or recorded[-1]
    try:
        cam(input_tensor=x, targets=targets)
    finally:
        cam.activations_and_grads.release()
    return np.maximum(recorded[0], 0)


def test_shapleycam_is_its_second_order_formula_and_pytorch_grad_cams(resnet, images) -> None:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    classes = [3, 7]
    stem = nn.Sequential(*list(resnet.children())[:-2])
    activations = stem(images).detach().requires_grad_(True)
    logits = resnet.fc(torch.flatten(resnet.avgpool(activations), 1))
    rest = 2 * logits[torch.arange(2), classes] - torch.logsumexp(logits, dim=1)
    (g,) = torch.autograd.grad(rest.sum(), activations, create_graph=True)
    (hvp,) = torch.autograd.grad(g, activations, activations.detach())
    assert hvp.abs().max() > 1e-3 * g.abs().max(), "the ReST target must be curved here"
    weights = (g - 0.5 * hvp).mean(dim=(2, 3))
    by_hand = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations)).detach()
    ours = get("shapleycam")(resnet, "layer4")(images, classes)
    assert_close(ours.raw, by_hand.numpy(), "by hand")
    assert_close(ours.scores, rest.detach().numpy(), "ReST scores")
    twin = copy.deepcopy(resnet)
    theirs = raw_of(
        pgc.ShapleyCAM(model=twin, target_layers=[twin.layer4]),
        images,
        [ClassifierOutputReST(c) for c in classes],
    )
    error = assert_close(ours.raw, theirs, "vs pytorch-grad-cam")
    print(f"shapleycam vs pytorch-grad-cam: {error:.1e}")
    # On the logit, whose Hessian after layer4 is zero (pooling and a linear layer), it is Grad-CAM.
    logit = get("shapleycam")(resnet, "layer4", rest=False)(images, classes)
    assert_close(logit.raw, get("gradcam")(resnet, "layer4")(images, classes).raw.numpy(), "rest=False")
    two = get("shapleycam")(resnet, "layer4")(images, topk=2)  # rows one by one
    assert_close(two.raw[0], get("shapleycam")(resnet, "layer4")(images).raw.numpy(), "row 0 of topk")
